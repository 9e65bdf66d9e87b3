"""Monitor: the served traffic of a window against the training run of the served versions.

Reads TF Serving request logs (`PredictionLog` TFRecords, serving/request_log.py writes
them), turns every logged Predict into faces and each model's answers, and compares them
with what the served versions were trained and evaluated on:

* the faces, with TFDV: statistics of the served faces (every pixel, and image features a
  person understands: mean brightness, contrast, the share of near-black and near-white
  pixels, a blur measure) are validated against the checked-in schema in its SERVING
  environment (no label at serving), and compared with the training split's statistics by
  each feature's `skew_comparator` (approximate Jensen-Shannon divergence);
* the answers, with TFDV too: each model's predicted-class shares (L-infinity) and
  confidence (Jensen-Shannon) against the same model's answers on the test split (the
  evaluation's `test_predictions.npz`), and the share of faces the ensemble sends to a
  person (the tie rule of core/ensemble.py, L-infinity on the review flag) against the
  review rate of the same models on the test split.

A distance above its threshold (core/config.py, MonitorConfig) is an alert. Outputs,
under `output_dir`: monitoring.json (every number), the TFDV anomalies (text protos) and
monitoring.html (components/monitor/page.py). With a review queue, the window's tied
faces and its lowest-confidence faces are queued for a person (serving/review_queue.py).

`run_monitor` takes the reference as directories (what lineage found: pipeline/monitor_command.py
resolves them for the CLI and the Kubeflow component); it never looks anything up itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_data_validation.statistics import stats_impl, stats_options
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import (CLASS_NAMES, EXAMPLES_PATTERN, FEATURE_PIXELS, IMAGE_SIZE,
    INPUT_EXAMPLES, INPUT_PIXELS, MONITORING_FILE, MONITORING_HTML, NUM_CLASSES, NUM_PIXELS,
    OUTPUT_PROBABILITIES, SIGNATURE_EXPLAIN, STATISTICS_FILE, TEST_PREDICTIONS_FILE)
from fer_pipeline.core.ensemble import combine, combine_batch
from fer_pipeline.core.errors import UserError
from fer_pipeline.serving.request_log import log_files, read_logs
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
SERVING_ENVIRONMENT = "SERVING"
# Pixel statistics look at 2,304 values per face; above this many faces a deterministic
# sample of them gives the same histogram (to three decimals) at a fraction of the time.
MAX_PIXEL_FACES = 20_000
REVIEW_SOURCE = "request log"
PAGE_FACES = 12                        # least confident faces shown on the page

# The image features, in the order the page shows them: name -> (what it is, config field
# of its threshold). Numbers are compared by Jensen-Shannon divergence; the two exposure
# features are categories per face (clipped or not), compared by L-infinity: the share of
# faces with many near-black (near-white) pixels. Each feature is chosen to move with one
# kind of change only: brightness does not move contrast or sharpness, contrast moves
# neither brightness nor sharpness (sharpness is relative to the face's own contrast).
IMAGE_FEATURES: dict[str, tuple[str, str]] = {
    "brightness": ("mean pixel value of a face (0 black - 255 white)", "brightness_js"),
    "contrast": ("standard deviation of a face's pixels", "contrast_js"),
    "dark_share": ("share of faces whose near-black pixels exceed clipped_share",
                   "dark_share_linf"),
    "bright_share": ("share of faces whose near-white pixels exceed clipped_share",
                     "bright_share_linf"),
    "sharpness": ("variance of the Laplacian over the face's variance (low: blurred)",
                  "sharpness_js"),
}
CATEGORICAL_FEATURES = ("dark_share", "bright_share")
CLIPPED, NOT_CLIPPED = b"clipped", b"not clipped"
PIXELS_CHECK = "pixels"
SCHEMA_CHECK = "schema"
REVIEW_CHECK = "review_rate"
REVIEW_FEATURE = "review"


class MonitorError(UserError, ValueError):
    """Nothing to compare (no logs in the window, no reference): one line for the user."""


@dataclass
class MonitorReference:
    """What the served versions came from (found through lineage by the caller)."""
    examples_dir: str                  # ingest's output: the train split's faces
    statistics_dir: str                # statistics' output: the train split's TFDV stats
    evaluations: dict[str, str]        # model -> evaluate's output holding its test answers
    versions: dict[str, int] = field(default_factory=dict)   # model -> served version


@dataclass
class Traffic:
    """Every face answered in the window, one row per (logged request, face)."""
    pixels: np.ndarray                 # uint8 [n, 48, 48]
    models: np.ndarray                 # str [n]
    versions: np.ndarray               # int64 [n]
    probabilities: np.ndarray          # float32 [n, 7]
    timestamps: np.ndarray             # int64 [n], seconds since the epoch (0: unknown)
    records: int                       # PredictionLogs in the window
    skipped: dict[str, int]            # why records were not used -> how many
    files: list[str]


@dataclass
class MonitorResult:
    monitoring_path: str
    html_path: str
    anomalies_paths: list[str]
    faces: int
    records: int
    alerts: list[str]
    verdict: str                       # "ok", "drift" or "too few requests"
    summary: str                       # one line for a person (the CLI prints it)
    review_queued: int = 0


# ----------------------------------------------------------------------------- reading logs

def _seconds(moment: Optional[datetime]) -> Optional[float]:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _faces_from_request(inputs: Mapping[str, Any]) -> np.ndarray:
    """The faces of one PredictRequest, uint8 [n, 48, 48], whichever signature it used."""
    if INPUT_PIXELS in inputs:
        values = tf.make_ndarray(inputs[INPUT_PIXELS])
        if values.size % NUM_PIXELS or values.min(initial=0) < 0 or \
                values.max(initial=0) > 255:
            raise ValueError("pixels are not 48x48 values in 0..255")
        return values.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    if INPUT_EXAMPLES in inputs:
        serialized = tf.make_ndarray(inputs[INPUT_EXAMPLES]).reshape(-1)
        faces = []
        for raw in serialized:
            example = tf.train.Example.FromString(raw)
            [pixels] = example.features.feature[FEATURE_PIXELS].bytes_list.value
            faces.append(np.frombuffer(pixels, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
        return np.stack(faces) if faces else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    raise ValueError(f"no {INPUT_PIXELS!r} or {INPUT_EXAMPLES!r} input")


def read_traffic(paths: Iterable[str], since: Optional[datetime] = None,
                 until: Optional[datetime] = None) -> Traffic:
    """The faces and answers of every logged Predict in [since, until).

    Records that are not a Predict (Classify), `explain` calls (a second look at faces
    already answered) and records that do not parse as faces and probabilities are counted
    in `skipped`, never guessed at.
    """
    files = log_files(list(paths))
    start, end = _seconds(since), _seconds(until)
    pixels, models, versions, probabilities, timestamps = [], [], [], [], []
    skipped: dict[str, int] = {}
    records = 0
    for record in read_logs(files):
        stamp = record.log_metadata.timestamp_secs
        if (start is not None and stamp < start) or (end is not None and stamp >= end):
            continue
        records += 1
        if record.WhichOneof("log_type") != "predict_log":
            skipped["not a Predict"] = skipped.get("not a Predict", 0) + 1
            continue
        spec = record.log_metadata.model_spec
        request, response = record.predict_log.request, record.predict_log.response
        if (spec.signature_name or request.model_spec.signature_name) == SIGNATURE_EXPLAIN:
            skipped["explain"] = skipped.get("explain", 0) + 1
            continue
        try:
            faces = _faces_from_request(request.inputs)
            probs = tf.make_ndarray(response.outputs[OUTPUT_PROBABILITIES]).reshape(
                -1, NUM_CLASSES).astype(np.float32)
            if len(probs) != len(faces):
                raise ValueError("faces and answers differ in number")
        except (ValueError, KeyError, TypeError) as error:
            reason = f"malformed ({error})"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        version = spec.version.value or response.model_spec.version.value
        pixels.append(faces)
        probabilities.append(probs)
        models += [spec.name or response.model_spec.name] * len(faces)
        versions.append(np.full(len(faces), version, np.int64))
        timestamps.append(np.full(len(faces), stamp, np.int64))
    if not pixels:
        return Traffic(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.array([], str),
                       np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), np.float32),
                       np.zeros(0, np.int64), records, skipped, files)
    return Traffic(np.concatenate(pixels), np.array(models), np.concatenate(versions),
                   np.concatenate(probabilities), np.concatenate(timestamps), records,
                   skipped, files)


# ----------------------------------------------------------------------------- features

def image_features(pixels: np.ndarray, config: MonitorConfig) -> dict[str, np.ndarray]:
    """Per face: brightness, contrast and sharpness (float64 [n]) and whether it is
    clipped dark / bright (bytes [n]); see IMAGE_FEATURES."""
    n = len(pixels)
    numbers = {name: np.zeros(n) for name in ("brightness", "contrast", "sharpness",
                                              "dark_share", "bright_share")}
    for start in range(0, n, 4096):   # bounded float copies for 100,000s of faces
        chunk = pixels[start:start + 4096].astype(np.float32)
        flat = chunk.reshape(len(chunk), -1)
        rows = slice(start, start + len(chunk))
        numbers["brightness"][rows] = flat.mean(axis=1)
        variance = flat.var(axis=1)
        numbers["contrast"][rows] = np.sqrt(variance)
        numbers["dark_share"][rows] = (flat <= config.dark_level).mean(axis=1)
        numbers["bright_share"][rows] = (flat >= config.bright_level).mean(axis=1)
        # 4-neighbour Laplacian on the interior: its variance falls when edges soften;
        # divided by the face's variance so a contrast change alone does not move it.
        laplacian = (chunk[:, :-2, 1:-1] + chunk[:, 2:, 1:-1] + chunk[:, 1:-1, :-2]
                     + chunk[:, 1:-1, 2:] - 4 * chunk[:, 1:-1, 1:-1])
        numbers["sharpness"][rows] = laplacian.reshape(len(chunk), -1).var(axis=1) / \
            np.maximum(variance, 1.0)
    features: dict[str, np.ndarray] = {}
    for name in IMAGE_FEATURES:
        if name in CATEGORICAL_FEATURES:
            features[name] = np.where(numbers[name] > config.clipped_share, CLIPPED,
                                      NOT_CLIPPED)
        else:
            features[name] = numbers[name]
    return features


def _list_column(values: np.ndarray, width: int = 1) -> pa.Array:
    flat = np.ascontiguousarray(values).reshape(-1)
    offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat))


def statistics(columns: Mapping[str, np.ndarray],
               pixels: Optional[np.ndarray] = None) -> statistics_pb2.DatasetFeatureStatisticsList:
    """TFDV statistics of per-face columns (numbers or strings) and, optionally, of every
    pixel (the same decoded view as components/statistics/executor.py: one int64 per pixel)."""
    arrays, names = [], []
    for name, values in columns.items():
        arrays.append(_list_column(np.asarray(values)))
        names.append(name)
    if pixels is not None:
        arrays.append(_list_column(pixels.astype(np.int64), NUM_PIXELS))
        names.append(FEATURE_PIXELS)
    batch = pa.RecordBatch.from_arrays(arrays, names)
    return stats_impl.generate_statistics_in_memory(batch, stats_options.StatsOptions())


def _pixel_sample(pixels: np.ndarray) -> np.ndarray:
    if len(pixels) <= MAX_PIXEL_FACES:
        return pixels
    keep = np.random.default_rng(0).choice(len(pixels), MAX_PIXEL_FACES, replace=False)
    return pixels[np.sort(keep)]


def _feature_stats(stats: statistics_pb2.DatasetFeatureStatisticsList, name: str):
    for feature in stats.datasets[0].features:
        if (feature.path.step and feature.path.step[0] == name) or feature.name == name:
            return feature
    return None


# ----------------------------------------------------------------------------- reference

def read_train_faces(examples_dir: str) -> np.ndarray:
    """The train split's faces, uint8 [n, 48, 48]."""
    files = fileio.glob(fileio.join(examples_dir, TRAIN_SPLIT, EXAMPLES_PATTERN))
    if not files:
        raise MonitorError(f"no training examples under {examples_dir}/{TRAIN_SPLIT}")
    spec = {FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string)}
    faces = []
    dataset = tf.data.TFRecordDataset(files).batch(4096).map(
        lambda batch: tf.io.decode_raw(tf.io.parse_example(batch, spec)[FEATURE_PIXELS],
                                       tf.uint8))
    for batch in dataset:
        faces.append(batch.numpy())
    return np.concatenate(faces).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def read_test_predictions(evaluation_dir: str, model: str) -> np.ndarray:
    """The model's probabilities on the test split, as the evaluation computed them."""
    path = fileio.join(evaluation_dir, TEST_PREDICTIONS_FILE)
    if not fileio.exists(path):
        raise MonitorError(f"{path} is missing: the evaluation that blessed {model} predates "
                           "monitoring; re-run `fer-pipeline evaluate` and push again")
    with np.load(io.BytesIO(fileio.read_bytes(path))) as saved:
        if model not in saved.files:
            raise MonitorError(f"{path} has no test answers of {model}")
        return saved[model]


def _train_statistics(reference: MonitorReference, config: MonitorConfig
                      ) -> tuple[statistics_pb2.DatasetFeatureStatisticsList, int]:
    """The train split's image-feature statistics, with the statistics step's own pixel
    statistics of the same split added (computed once per run, not per window)."""
    faces = read_train_faces(reference.examples_dir)
    stats = statistics(image_features(faces, config))
    path = fileio.join(reference.statistics_dir, TRAIN_SPLIT, STATISTICS_FILE)
    if not fileio.exists(path):
        raise MonitorError(f"no training statistics at {path}")
    fileio.register_filesystem(path)
    pixel_stats = _feature_stats(tfdv.load_statistics(path), FEATURE_PIXELS)
    if pixel_stats is None:
        raise MonitorError(f"{path} has no {FEATURE_PIXELS!r} statistics")
    stats.datasets[0].features.add().CopyFrom(pixel_stats)
    return stats, len(faces)


# ----------------------------------------------------------------------------- schemas

def face_schema(schema_path: str, config: MonitorConfig) -> schema_pb2.Schema:
    """The checked-in schema (its SERVING environment: no label) plus the image features,
    each with its skew comparator threshold from the config."""
    schema = tfdv.load_schema_text(schema_path)
    if SERVING_ENVIRONMENT not in schema.default_environment:
        raise MonitorError(f"{schema_path} declares no {SERVING_ENVIRONMENT} environment")
    for feature in schema.feature:
        if feature.name == FEATURE_PIXELS:
            feature.skew_comparator.jensen_shannon_divergence.threshold = config.pixels_js
    for name, (_, threshold_field) in IMAGE_FEATURES.items():
        categorical = name in CATEGORICAL_FEATURES
        feature = schema.feature.add(name=name, type=schema_pb2.BYTES if categorical
                                     else schema_pb2.FLOAT)
        feature.presence.min_fraction = 1.0
        feature.value_count.min = feature.value_count.max = 1
        comparator = feature.skew_comparator
        if categorical:
            comparator.infinity_norm.threshold = getattr(config, threshold_field)
        else:
            comparator.jensen_shannon_divergence.threshold = getattr(config, threshold_field)
    return schema


def answers_schema(models: Sequence[str], with_review: bool,
                   config: MonitorConfig) -> schema_pb2.Schema:
    schema = schema_pb2.Schema()
    for model in models:
        classes = schema.feature.add(name=f"class_{model}", type=schema_pb2.BYTES)
        classes.skew_comparator.infinity_norm.threshold = config.class_mix_linf
        confidence = schema.feature.add(name=f"confidence_{model}", type=schema_pb2.FLOAT)
        confidence.skew_comparator.jensen_shannon_divergence.threshold = config.confidence_js
    if with_review:
        review = schema.feature.add(name=REVIEW_FEATURE, type=schema_pb2.BYTES)
        review.skew_comparator.infinity_norm.threshold = config.review_rate_linf
    return schema


def _skew(reference: statistics_pb2.DatasetFeatureStatisticsList,
          served: statistics_pb2.DatasetFeatureStatisticsList,
          schema: schema_pb2.Schema, environment: Optional[str] = None
          ) -> tuple[dict[str, tuple[float, float]], anomalies_pb2.Anomalies]:
    """feature -> (distance, threshold) from TFDV's skew comparators, and the anomalies."""
    anomalies = tfdv.validate_statistics(reference, schema, environment=environment,
                                         serving_statistics=served)
    measured = {}
    for info in anomalies.drift_skew_info:
        for measurement in info.skew_measurements:
            measured[info.path.step[0]] = (float(measurement.value),
                                           float(measurement.threshold))
    return measured, anomalies


# ----------------------------------------------------------------------------- answers

@dataclass
class Answers:
    """Per model its answers (class id, confidence), and the ensemble's review flags."""
    class_ids: dict[str, np.ndarray]
    confidences: dict[str, np.ndarray]
    review: Optional[np.ndarray]       # bool [faces answered by every model]; None: 1 model


def answers_from_probabilities(probs_by_model: Mapping[str, np.ndarray],
                               tolerance: float) -> Answers:
    review = (combine_batch(probs_by_model, tolerance)[2] if len(probs_by_model) > 1
              and len(next(iter(probs_by_model.values()))) else None)
    return Answers({m: p.argmax(axis=1) for m, p in probs_by_model.items()},
                   {m: p.max(axis=1).astype(np.float64) for m, p in probs_by_model.items()},
                   review)


def _answer_columns(answers: Answers) -> dict[str, dict[str, np.ndarray]]:
    """Separate column groups (their lengths differ): one per model, one for review."""
    groups = {model: {f"class_{model}": np.array(CLASS_NAMES, dtype=object)[ids].astype(bytes),
                      f"confidence_{model}": answers.confidences[model]}
              for model, ids in answers.class_ids.items()}
    if answers.review is not None:
        groups[REVIEW_FEATURE] = {REVIEW_FEATURE: np.where(answers.review, b"review",
                                                           b"decided")}
    return groups


def _merged_statistics(groups: Mapping[str, Mapping[str, np.ndarray]]
                       ) -> statistics_pb2.DatasetFeatureStatisticsList:
    """One statistics list holding every group's features (TFDV compares per feature)."""
    merged = statistics_pb2.DatasetFeatureStatisticsList()
    dataset = merged.datasets.add()
    for columns in groups.values():
        if not len(next(iter(columns.values()))):
            continue
        part = statistics(columns).datasets[0]
        dataset.num_examples = max(dataset.num_examples, part.num_examples)
        for feature in part.features:
            dataset.features.add().CopyFrom(feature)
    return merged


def served_answers(traffic: Traffic, primary: Mapping[str, int], tolerance: float
                   ) -> tuple[Answers, dict[str, np.ndarray], np.ndarray]:
    """Answers of each model's primary version; the ensemble over faces every model
    answered (paired by pixel content: the client sends the same face to each model).

    Returns the answers, per model the traffic rows used, and the traffic rows of the
    faces the ensemble judged (first model's rows), in the order of `answers.review`.
    """
    rows = {model: np.flatnonzero((traffic.models == model) & (traffic.versions == version))
            for model, version in primary.items()}
    probs = {model: traffic.probabilities[index] for model, index in rows.items()}
    class_ids = {m: p.argmax(axis=1) for m, p in probs.items()}
    confidences = {m: p.max(axis=1).astype(np.float64) for m, p in probs.items()}
    review, paired_rows = None, np.zeros(0, np.int64)
    if len(rows) > 1:
        by_hash: list[dict[bytes, int]] = []
        for model, index in rows.items():
            lookup: dict[bytes, int] = {}
            for row in index:
                lookup[hashlib.sha1(traffic.pixels[row].tobytes()).digest()] = int(row)
            by_hash.append(lookup)
        common = [key for key in by_hash[0] if all(key in other for other in by_hash[1:])]
        paired = {model: traffic.probabilities[[lookup[k] for k in common]]
                  for model, lookup in zip(rows, by_hash)}
        paired_rows = np.array([by_hash[0][k] for k in common], np.int64)
        review = (combine_batch(paired, tolerance)[2] if common
                  else np.zeros(0, bool))
    return Answers(class_ids, confidences, review), rows, paired_rows


# ----------------------------------------------------------------------------- comparing

def _check(name: str, kind: str, measure: str, distance: Optional[float], threshold: float,
           judged: bool, description: str) -> dict[str, Any]:
    return {"name": name, "kind": kind, "measure": measure, "distance": distance,
            "threshold": threshold, "description": description,
            "alert": bool(judged and distance is not None and distance > threshold)}


def _class_mix(class_ids: np.ndarray) -> dict[str, float]:
    counts = np.bincount(class_ids, minlength=NUM_CLASSES)
    total = max(int(counts.sum()), 1)
    return {CLASS_NAMES[k]: float(counts[k] / total) for k in range(NUM_CLASSES)}


def _summary_numbers(answers: Answers) -> dict[str, Any]:
    return {
        "class_mix": {m: _class_mix(ids) for m, ids in answers.class_ids.items()},
        "mean_confidence": {m: (float(c.mean()) if len(c) else None)
                            for m, c in answers.confidences.items()},
        "review_rate": (float(answers.review.mean()) if answers.review is not None
                        and len(answers.review) else None),
    }


def compare(traffic_rows: np.ndarray, traffic: Traffic, features: Mapping[str, np.ndarray],
            answers: Answers, reference: "LoadedReference", config: MonitorConfig,
            include_pixels: bool, judged: bool
            ) -> tuple[list[dict[str, Any]], dict[str, anomalies_pb2.Anomalies]]:
    """Every check of one window: the faces against the train split, the answers against
    the test split. `judged=False` (too few faces) measures without alerting."""
    served_faces = statistics({n: v[traffic_rows] for n, v in features.items()})
    if include_pixels:
        # The pixel histogram from a sample when the window is large (MAX_PIXEL_FACES),
        # added beside the per-face features, which use every face.
        sampled = statistics({}, _pixel_sample(traffic.pixels[traffic_rows]))
        served_faces.datasets[0].features.add().CopyFrom(
            _feature_stats(sampled, FEATURE_PIXELS))
    schema = reference.face_schema
    if not include_pixels:
        schema = schema_pb2.Schema()
        schema.CopyFrom(reference.face_schema)
        for feature in schema.feature:
            if feature.name == FEATURE_PIXELS:
                feature.ClearField("skew_comparator")
    measured, skew_anomalies = _skew(reference.train_stats, served_faces, schema,
                                     SERVING_ENVIRONMENT)
    checks = [_check(name, "image", "l_infinity" if name in CATEGORICAL_FEATURES
                     else "jensen_shannon_divergence",
                     *measured.get(name, (None, getattr(config, field_name))), judged,
                     description)
              for name, (description, field_name) in IMAGE_FEATURES.items()]
    anomalies = {"skew": skew_anomalies}
    if include_pixels:
        checks.append(_check(PIXELS_CHECK, "image", "jensen_shannon_divergence",
                             *measured.get(PIXELS_CHECK, (None, config.pixels_js)), judged,
                             "histogram of every pixel value (TFDV)"))
        serving = tfdv.validate_statistics(served_faces, reference.face_schema,
                                           environment=SERVING_ENVIRONMENT)
        anomalies["serving"] = serving
        problems = {name: info.description for name, info in serving.anomaly_info.items()}
        checks.append({"name": SCHEMA_CHECK, "kind": "schema", "measure": "anomalies",
                       "distance": float(len(problems)), "threshold": 0.0,
                       "description": "; ".join(f"{k}: {v}" for k, v in sorted(
                           problems.items())) or "served faces match the schema",
                       "alert": bool(problems)})
    models = [m for m in answers.class_ids if m in reference.answers.class_ids
              and len(answers.class_ids[m])]
    with_review = answers.review is not None and reference.answers.review is not None \
        and len(answers.review) > 0
    served_groups = _answer_columns(answers)
    keep = set(models) | ({REVIEW_FEATURE} if with_review else set())
    measured, answer_anomalies = _skew(
        reference.answer_statistics(keep),
        _merged_statistics({k: v for k, v in served_groups.items() if k in keep}),
        answers_schema(models, with_review, config))
    anomalies["answers"] = answer_anomalies
    for model in models:
        checks.append(_check(f"class_mix:{model}", "class_mix", "l_infinity",
                             *measured.get(f"class_{model}", (None, config.class_mix_linf)),
                             judged, f"{model}'s predicted-class shares"))
        checks.append(_check(f"confidence:{model}", "confidence", "jensen_shannon_divergence",
                             *measured.get(f"confidence_{model}", (None, config.confidence_js)),
                             judged, f"{model}'s confidence in its answer"))
    if with_review:
        checks.append(_check(REVIEW_CHECK, "review_rate", "l_infinity",
                             *measured.get(REVIEW_FEATURE, (None, config.review_rate_linf)),
                             judged, "share of faces the ensemble sends to a person"))
    return checks, anomalies


@dataclass
class LoadedReference:
    """The reference in memory: the train split's statistics, the schema with the image
    features, the test split's answers (and their statistics, per set of models, computed
    once however many windows are judged)."""
    train_stats: statistics_pb2.DatasetFeatureStatisticsList
    train_faces: int
    face_schema: schema_pb2.Schema
    answers: Answers
    answer_groups: dict[str, dict[str, np.ndarray]]
    test_faces: int
    answer_stats: dict[frozenset, statistics_pb2.DatasetFeatureStatisticsList] = field(
        default_factory=dict)

    def answer_statistics(self, groups: set[str]) -> statistics_pb2.DatasetFeatureStatisticsList:
        key = frozenset(groups)
        if key not in self.answer_stats:
            self.answer_stats[key] = _merged_statistics(
                {k: v for k, v in self.answer_groups.items() if k in key})
        return self.answer_stats[key]


def _load_reference(reference: MonitorReference, schema_path: str, config: MonitorConfig,
                    tolerance: float, models: Sequence[str]) -> LoadedReference:
    train_stats, train_faces = _train_statistics(reference, config)
    probs = {m: read_test_predictions(reference.evaluations[m], m) for m in models}
    lengths = {len(p) for p in probs.values()}
    if len(lengths) > 1:
        # Versions evaluated on different test splits: no common ensemble to compare with.
        answers = Answers({m: p.argmax(axis=1) for m, p in probs.items()},
                          {m: p.max(axis=1).astype(np.float64) for m, p in probs.items()},
                          None)
    else:
        answers = answers_from_probabilities(probs, tolerance)
    return LoadedReference(train_stats, train_faces, face_schema(schema_path, config), answers,
                      _answer_columns(answers), lengths.pop() if len(lengths) == 1 else 0)


# ----------------------------------------------------------------------------- windows

def _window_bounds(timestamps: np.ndarray, minutes: float) -> list[tuple[int, int]]:
    known = timestamps[timestamps > 0]
    if not len(known) or minutes <= 0:
        return []
    width = int(minutes * 60)
    first = int(known.min()) // width * width
    return [(start, start + width) for start in range(first, int(known.max()) + 1, width)]


def _iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _verdict(faces: int, alerts: list[str], checks: list[dict[str, Any]],
             config: MonitorConfig) -> tuple[str, str]:
    if faces < config.min_requests:
        return ("too few requests",
                f"{faces} faces in the window, fewer than monitor.min_requests "
                f"({config.min_requests}): distances shown, no alert raised")
    if not alerts:
        return "ok", f"no drift: {faces} faces, every distance within its threshold"
    crossed = [c for c in checks if c["alert"]]
    parts = [f"{c['name']} {c['distance']:.3f} > {c['threshold']:.3f}" if c["kind"] != "schema"
             else f"schema: {c['description']}" for c in crossed]
    return "drift", f"drift in {faces} faces: " + "; ".join(parts)


# ----------------------------------------------------------------------------- review queue

def _lowest_confidence_rows(traffic: Traffic, rows: Mapping[str, np.ndarray],
                            limit: int) -> list[int]:
    """Traffic rows of the `limit` distinct faces some model answered least confidently."""
    every = np.concatenate(list(rows.values())) if rows else np.zeros(0, np.int64)
    confidence = traffic.probabilities[every].max(axis=1) if len(every) else np.zeros(0)
    chosen: dict[bytes, int] = {}
    for row in every[np.argsort(confidence, kind="stable")]:
        if len(chosen) >= limit:
            break
        chosen.setdefault(traffic.pixels[row].tobytes(), int(row))
    return list(chosen.values())


def _answers_by_face(traffic: Traffic, rows: Mapping[str, np.ndarray],
                     wanted: set[bytes]) -> dict[bytes, dict[str, int]]:
    """For each wanted face (pixel bytes): model -> its traffic row."""
    found: dict[bytes, dict[str, int]] = {}
    for model, index in rows.items():
        for row in index:
            key = traffic.pixels[row].tobytes()
            if key in wanted:
                found.setdefault(key, {})[model] = int(row)
    return found


def least_confident_faces(traffic: Traffic, rows: Mapping[str, np.ndarray],
                          limit: int) -> list[dict[str, Any]]:
    """The page's gallery: pixels and every model's answer of the least confident faces."""
    chosen = _lowest_confidence_rows(traffic, rows, limit)
    answers = _answers_by_face(traffic, rows, {traffic.pixels[r].tobytes() for r in chosen})
    faces = []
    for row in chosen:
        per_model = answers[traffic.pixels[row].tobytes()]
        faces.append({"pixels": traffic.pixels[row], "row": row, "answers": {
            m: {"class_name": CLASS_NAMES[int(traffic.probabilities[r].argmax())],
                "confidence": float(traffic.probabilities[r].max())}
            for m, r in per_model.items()}})
    return faces


def queue_for_review(queue_dir: str, traffic: Traffic, answers: Answers,
                     rows: Mapping[str, np.ndarray], paired_rows: np.ndarray,
                     tolerance: float, lowest: int) -> dict[str, int]:
    """Queues the window's tied faces and its `lowest` lowest-confidence ones."""
    chosen: dict[bytes, tuple[str, int]] = {}
    if answers.review is not None:
        for row in paired_rows[answers.review]:
            chosen.setdefault(traffic.pixels[row].tobytes(), ("tied", int(row)))
    for row in _lowest_confidence_rows(traffic, rows, lowest):
        chosen.setdefault(traffic.pixels[row].tobytes(), ("low confidence", row))
    found = _answers_by_face(traffic, rows, set(chosen))
    by_face = {key: {m: ModelPrediction(int(traffic.versions[r]), traffic.probabilities[r])
                     for m, r in per_model.items()} for key, per_model in found.items()}
    queued = already = 0
    with ReviewQueue(queue_dir) as queue:
        for key, (why, row) in chosen.items():
            predictions = by_face[key]
            decision = dataclasses.asdict(combine(
                {m: p.probabilities for m, p in predictions.items()}, tolerance))
            decision["monitor_reason"] = why
            stamp = int(traffic.timestamps[row])
            result = queue.record(traffic.pixels[row], f"{REVIEW_SOURCE} {_iso(stamp) or ''}"
                                  .strip(), predictions, decision)
            queued += int(result.inserted)
            already += int(not result.inserted)
    return {"queued": queued, "already_queued": already}


# ----------------------------------------------------------------------------- entry point

@dataclass
class Assessment:
    """One window judged: every check, the verdict, and what the outputs are built from."""
    traffic: Traffic
    primary: dict[str, int]            # model -> the version judged
    answers: Answers
    rows: dict[str, np.ndarray]        # model -> its primary version's traffic rows
    paired_rows: np.ndarray            # rows of the faces the ensemble judged
    faces: int
    checks: list[dict[str, Any]]
    anomalies: dict[str, anomalies_pb2.Anomalies]
    alerts: list[str]
    verdict: str
    summary: str
    windows: list[dict[str, Any]]


def load_reference(reference: MonitorReference, schema_path: str, config: MonitorConfig,
                   tie_tolerance: float, models: Sequence[str]) -> LoadedReference:
    """Everything the window is compared with, read once (a scheduler judging many
    windows of one served version can keep it)."""
    return _load_reference(reference, schema_path, config, tie_tolerance, models)


def assess(traffic: Traffic, reference: MonitorReference, loaded: LoadedReference,
           config: MonitorConfig, tie_tolerance: float) -> Assessment:
    """Judges the traffic against the loaded reference: the checks, alerts and verdict."""
    primary = _primary_versions(traffic, reference)
    if not primary:
        raise MonitorError(f"the logs name {sorted(set(traffic.models))}, none of which has "
                           f"a reference (served models with lineage: "
                           f"{sorted(reference.evaluations)})")
    features = image_features(traffic.pixels, config)
    answers, rows, paired_rows = served_answers(traffic, primary, tie_tolerance)
    # Each face once: every model answered the same faces, so the image checks use the
    # rows of the model that answered most (a face sent twice by a user counts twice).
    face_rows = max(rows.values(), key=len)
    faces = int(len(face_rows))
    checks, anomalies = compare(face_rows, traffic, features, answers, loaded, config,
                                include_pixels=True, judged=faces >= config.min_requests)
    alerts = [c["name"] for c in checks if c["alert"]]
    verdict, summary = _verdict(faces, alerts, checks, config)
    windows = _windows(traffic, features, primary, face_rows, loaded, config, tie_tolerance)
    return Assessment(traffic, primary, answers, rows, paired_rows, faces, checks, anomalies,
                      alerts, verdict, summary, windows)


def logged_versions(traffic: Traffic) -> dict[str, int]:
    """Per model in the traffic: the version that answered most of its faces."""
    found = {}
    for model in sorted(set(traffic.models)):
        versions, counts = np.unique(traffic.versions[traffic.models == model],
                                     return_counts=True)
        found[str(model)] = int(versions[counts.argmax()])
    return found


def run_monitor(log_paths: Sequence[str],
                reference: Union[MonitorReference,
                                 Callable[[dict[str, int]], MonitorReference]],
                schema_path: str, output_dir: str, config: MonitorConfig,
                tie_tolerance: float, *, since: Optional[datetime] = None,
                until: Optional[datetime] = None,
                review_queue: Optional[str] = None) -> MonitorResult:
    """Compares the logged traffic of [since, until) with the reference; see the module doc.

    `reference` is what the served versions came from, or a function that finds it given
    the versions the logs name ({model: the version that answered most}): the caller that
    looks it up in lineage (pipeline/monitor_command.py) only knows which versions to look up
    once the logs are read.
    """
    started = time.time()
    timings: dict[str, float] = {}
    traffic = read_traffic(log_paths, since, until)
    timings["read_logs"] = time.time() - started
    if not len(traffic.pixels):
        raise MonitorError(f"no logged predictions in {len(traffic.files)} request log "
                           f"file(s) for the window [{_iso(_seconds(since)) or 'start'}, "
                           f"{_iso(_seconds(until)) or 'end'})")
    if callable(reference):
        reference = reference(logged_versions(traffic))
    models = list(_primary_versions(traffic, reference)) or list(reference.evaluations)
    mark = time.time()
    loaded = load_reference(reference, schema_path, config, tie_tolerance, models)
    timings["load_reference"] = time.time() - mark
    mark = time.time()
    judged = assess(traffic, reference, loaded, config, tie_tolerance)
    timings["judge"] = time.time() - mark
    mark = time.time()

    fileio.makedirs(output_dir)
    fileio.register_filesystem(output_dir)
    anomalies_paths = []
    for name, proto in judged.anomalies.items():
        path = fileio.join(output_dir, f"{name}.anomalies.pbtxt")
        tfdv.write_anomalies_text(proto, path)
        anomalies_paths.append(path)
    review = (queue_for_review(review_queue, traffic, judged.answers, judged.rows,
                               judged.paired_rows, tie_tolerance,
                               config.review_lowest_confidence)
              if review_queue else None)
    known = traffic.timestamps[traffic.timestamps > 0]
    record = {
        "verdict": judged.verdict, "summary": judged.summary, "alerts": judged.alerts,
        "window": {"since": _iso(_seconds(since)), "until": _iso(_seconds(until)),
                   "first_request": _iso(known.min()) if len(known) else None,
                   "last_request": _iso(known.max()) if len(known) else None},
        "log_files": traffic.files, "records": traffic.records, "faces": judged.faces,
        "skipped": traffic.skipped,
        "served": {model: {"version": int(version), "faces": int(len(judged.rows[model])),
                           "other_versions": _other_versions(traffic, model, version)}
                   for model, version in judged.primary.items()},
        "ignored_models": sorted(set(traffic.models) - set(judged.primary)),
        "reference": {"examples_dir": reference.examples_dir,
                      "statistics_dir": reference.statistics_dir,
                      "evaluations": reference.evaluations,
                      "versions": reference.versions, "train_faces": loaded.train_faces,
                      "test_faces": loaded.test_faces},
        "checks": judged.checks,
        "traffic": _summary_numbers(judged.answers),
        "expected": _summary_numbers(loaded.answers),
        "windows": judged.windows,
        "thresholds": dataclasses.asdict(config),
        "tie_tolerance": tie_tolerance,
        "anomalies_files": anomalies_paths,
        "review_queue": ({"dir": review_queue, **review} if review is not None else None),
    }
    # Rendering needs matplotlib; the checks above do not.
    from fer_pipeline.components.monitor.page import render_monitoring_page
    html_path = fileio.join(output_dir, MONITORING_HTML)
    fileio.write_text(html_path, render_monitoring_page(
        record, least_confident_faces(traffic, judged.rows, PAGE_FACES)))
    timings["write_outputs"] = time.time() - mark
    record["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    record["duration_s"] = round(time.time() - started, 3)
    monitoring_path = fileio.join(output_dir, MONITORING_FILE)
    fileio.write_json(monitoring_path, record)
    log.info("monitor: %s", judged.summary)
    return MonitorResult(monitoring_path, html_path, anomalies_paths, judged.faces,
                         traffic.records, judged.alerts, judged.verdict, judged.summary,
                         review["queued"] if review is not None else 0)


def _primary_versions(traffic: Traffic, reference: MonitorReference) -> dict[str, int]:
    """Per model with a reference: the version that answered most faces in the window
    (the reference describes that version; a push mid-window leaves the others counted)."""
    primary = {}
    for model in sorted(set(traffic.models)):
        if model not in reference.evaluations:
            continue
        versions, counts = np.unique(traffic.versions[traffic.models == model],
                                     return_counts=True)
        wanted = reference.versions.get(model)
        primary[model] = int(wanted if wanted in versions else versions[counts.argmax()])
    return primary


def _other_versions(traffic: Traffic, model: str, version: int) -> dict[str, int]:
    mask = (traffic.models == model) & (traffic.versions != version)
    versions, counts = np.unique(traffic.versions[mask], return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(versions, counts)}


def _windows(traffic: Traffic, features: Mapping[str, np.ndarray], primary: Mapping[str, int],
             face_rows: np.ndarray, ref: LoadedReference, config: MonitorConfig,
             tolerance: float) -> list[dict[str, Any]]:
    """The same numbers per time window of `config.window_minutes` (no pixel histogram)."""
    windows = []
    for start, end in _window_bounds(traffic.timestamps[face_rows], config.window_minutes):
        inside = (traffic.timestamps >= start) & (traffic.timestamps < end)
        rows = face_rows[inside[face_rows]]
        if not len(rows):
            continue
        part = dataclasses.replace(
            traffic, pixels=traffic.pixels[inside], models=traffic.models[inside],
            versions=traffic.versions[inside], probabilities=traffic.probabilities[inside],
            timestamps=traffic.timestamps[inside])
        answers, _, _ = served_answers(part, primary, tolerance)
        local = np.flatnonzero(inside)
        position = np.searchsorted(local, rows)
        checks, _ = compare(position, part, {n: v[inside] for n, v in features.items()},
                            answers, ref, config, include_pixels=False,
                            judged=len(rows) >= config.min_requests)
        windows.append({"start": _iso(start), "end": _iso(end), "faces": int(len(rows)),
                        **_summary_numbers(answers),
                        "distances": {c["name"]: c["distance"] for c in checks},
                        "alerts": [c["name"] for c in checks if c["alert"]]})
    return windows
