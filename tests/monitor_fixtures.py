"""A served pair of models, the run they came from and logged traffic, for the monitor tests.

Nothing here trains. The reference a monitor compares with is built the way the pipeline
builds it: a train and a test split of synthetic faces as ingest writes them, the train
split's TFDV statistics as the statistics step writes them, and the evaluation's
test_predictions.npz from running the served SavedModels over the test split.

The models are real SavedModels with the export contract's signatures (like
tests/serving_fixtures.py), but they standardize each face first (subtract its mean,
divide by its standard deviation) and then apply a linear discriminant computed in closed
form from the train split (class means and a shrunk covariance: no training loop; about
45 % accurate, happy faces best). Such a model is blind to a face's brightness and
contrast, as a well-trained model should nearly be, so a lighting shift moves the image
features and not the answers, and each injected drift raises only its own alert. Two
models from the two halves of the train split disagree now and then, so the ensemble sends
some faces to review, as the real pair does.

Traffic is logged as TF Serving's PredictionLog TFRecords: one Predict per batch of faces
and model, request and response as the server would log them, each model's record of one
request carrying the same request id (as the ensemble client's X-Request-Id makes it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from fer_pipeline.components.evaluator import write_test_predictions
from fer_pipeline.components.monitor.features import statistics
from fer_pipeline.components.monitor.reference import MonitorReference
from fer_pipeline.pipeline.synthetic import FER_CLASS_COUNTS, allocate, draw_faces
from fer_pipeline.core.contract import (CLASS_NAMES, EXAMPLES_PATTERN, FEATURE_LABEL, FEATURE_PIXELS,
    NUM_CLASSES, NUM_PIXELS, STATISTICS_FILE, TEST_PREDICTIONS_FILE)
from tests.serving_fixtures import TinyFerModel

MODELS = {"cnn": 2, "vgg16": 1}        # served versions
# Mean confidence on the train split per model: vgg16 is the less confident one.
MEAN_CONFIDENCE = {"cnn": 0.7, "vgg16": 0.6}
TRAIN_SEED, TEST_SEED = 11, 12
TRAIN_FACES, TEST_FACES = 4000, 1200
SHRINKAGE = 0.1
FACES_PER_REQUEST = 8
START = 1_790_000_000                  # a fixed clock: 2026-09-21T14:13:20Z


class StandardizingTemplateModel(TinyFerModel):
    """softmax(standardize(face) @ weights + bias) behind the contract's signatures."""

    def _features(self, flat: tf.Tensor) -> tf.Tensor:
        mean, variance = tf.nn.moments(flat, axes=[1], keepdims=True)
        return (flat - mean) / tf.sqrt(variance + 1.0)


def linear_discriminant(standardized: np.ndarray, labels: np.ndarray,
                        mean_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights [2304, 7] and bias of a shrinkage linear discriminant over standardized faces
    pooled to 24x24 (closed form, no training loop), its logits scaled so that its mean
    confidence on these faces is about `mean_confidence`."""
    pooled = standardized.reshape(-1, 24, 2, 24, 2).mean(axis=(2, 4)).reshape(
        len(standardized), -1)
    means = np.stack([pooled[labels == k].mean(axis=0) for k in range(NUM_CLASSES)])
    covariance = np.cov((pooled - means[labels]).T)
    covariance += SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    pooled_weights = np.linalg.solve(covariance, means.T)                  # [576, 7]
    priors = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    bias = -0.5 * (means * pooled_weights.T).sum(axis=1) + np.log(priors)
    # Pooling is linear: each pixel carries a quarter of its 2x2 cell's weight.
    weights = np.repeat(np.repeat(pooled_weights.reshape(24, 24, NUM_CLASSES), 2, axis=0),
                        2, axis=1).reshape(NUM_PIXELS, NUM_CLASSES) / 4
    logits = standardized @ weights + bias
    low, high = 1e-3, 10.0
    for _ in range(40):   # bisection on the temperature
        scale = (low + high) / 2
        scaled = logits * scale
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        confidence = (probs.max(axis=1) / probs.sum(axis=1)).mean()
        low, high = (scale, high) if confidence < mean_confidence else (low, scale)
    return weights * scale, bias * scale


def labels_like_fer(count: int, rng: np.random.Generator,
                    shares: dict[str, float] | None = None) -> np.ndarray:
    """Labels in FER-2013's class proportions (or `shares`), shuffled."""
    per_class = allocate(shares or FER_CLASS_COUNTS, count)
    labels = np.concatenate([np.full(n, CLASS_NAMES.index(name), np.int64)
                             for name, n in per_class.items()])
    return rng.permutation(labels)


def _standardize(faces: np.ndarray) -> np.ndarray:
    flat = faces.reshape(len(faces), -1).astype(np.float32)
    return (flat - flat.mean(axis=1, keepdims=True)) / np.sqrt(
        flat.var(axis=1, keepdims=True) + 1.0)


def _write_examples(directory: str, faces: np.ndarray, labels: np.ndarray) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EXAMPLES_PATTERN.replace("*", "00000-of-00001"))
    with tf.io.TFRecordWriter(path) as writer:
        for pixels, label in zip(faces, labels):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                FEATURE_PIXELS: tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[pixels.tobytes()])),
                FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[int(label)]))})).SerializeToString())


@dataclass
class ServedRun:
    reference: MonitorReference
    models: dict[str, str]             # model -> SavedModel directory
    test_faces: np.ndarray
    test_labels: np.ndarray


def build_served_run(root: str) -> ServedRun:
    """Examples, statistics, evaluation and two served models under `root`."""
    train_rng = np.random.default_rng(TRAIN_SEED)
    train_labels = labels_like_fer(TRAIN_FACES, train_rng)
    train_faces = draw_faces(train_labels, train_rng)
    test_rng = np.random.default_rng(TEST_SEED)
    test_labels = labels_like_fer(TEST_FACES, test_rng)
    test_faces = draw_faces(test_labels, test_rng)
    examples = os.path.join(root, "examples")
    _write_examples(os.path.join(examples, "train"), train_faces, train_labels)
    _write_examples(os.path.join(examples, "test"), test_faces, test_labels)

    statistics_dir = os.path.join(root, "statistics")
    os.makedirs(os.path.join(statistics_dir, "train"))
    with tf.io.TFRecordWriter(os.path.join(statistics_dir, "train", STATISTICS_FILE)) as w:
        w.write(statistics({}, train_faces).SerializeToString())

    standardized = _standardize(train_faces)
    models, probabilities = {}, {}
    for index, name in enumerate(MODELS):
        # Each model learns its templates from its own half of the train split, so the
        # two disagree now and then, as two trained models do.
        half = slice(index * len(train_faces) // 2, (index + 1) * len(train_faces) // 2)
        weights, bias = linear_discriminant(standardized[half], train_labels[half],
                                            MEAN_CONFIDENCE[name])
        module = StandardizingTemplateModel(weights, bias)
        path = os.path.join(root, "models", name)
        tf.saved_model.save(module, path, signatures={
            "serving_default": module.serve_int32.get_concrete_function(),
            "serving_uint8": module.serve_uint8.get_concrete_function()})
        models[name] = path
        probabilities[name] = predict(path, test_faces)
    evaluation = os.path.join(root, "evaluation")
    os.makedirs(evaluation)
    write_test_predictions(os.path.join(evaluation, TEST_PREDICTIONS_FILE), probabilities)
    reference = MonitorReference(examples, statistics_dir,
                                 {name: evaluation for name in MODELS}, dict(MODELS))
    return ServedRun(reference, models, test_faces, test_labels)


_LOADED: dict[str, object] = {}


def predict(model_dir: str, faces: np.ndarray) -> np.ndarray:
    if model_dir not in _LOADED:
        _LOADED[model_dir] = tf.saved_model.load(model_dir)
    signature = _LOADED[model_dir].signatures["serving_uint8"]
    return signature(pixels=tf.constant(faces.astype(np.uint8)))["probabilities"].numpy()


def write_request_log(path: str, faces: np.ndarray, run: ServedRun, start: int = START,
                      seconds_per_request: float = 1.0) -> int:
    """Logs `faces` as Predicts to every served model, as fer-serve would; returns records."""
    return log_predictions(path, faces, {name: (version, run.models[name])
                                         for name, version in MODELS.items()},
                           start, seconds_per_request)


def log_predictions(path: str, faces: np.ndarray, served: dict[str, tuple[int, str]],
                    start: int = START, seconds_per_request: float = 1.0) -> int:
    """`faces` sent in batches to each model of `served` ({name: (version, SavedModel
    dir)}), logged as TF Serving PredictionLogs with the answers the models give; request
    ids are unique to the file (its name and the batch)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    records = 0
    answers = {name: predict(model_dir, faces) for name, (_, model_dir) in served.items()}
    with tf.io.TFRecordWriter(path) as writer:
        for i, begin in enumerate(range(0, len(faces), FACES_PER_REQUEST)):
            batch = faces[begin:begin + FACES_PER_REQUEST]
            for name, (version, _) in served.items():
                entry = prediction_log_pb2.PredictionLog()
                entry.log_metadata.model_spec.name = name
                entry.log_metadata.model_spec.version.value = version
                entry.log_metadata.model_spec.signature_name = "serving_uint8"
                entry.log_metadata.sampling_config.sampling_rate = 1.0
                entry.log_metadata.timestamp_secs = int(start + i * seconds_per_request)
                entry.log_metadata.request_origin = f"{os.path.basename(path)}-{i}"
                request = entry.predict_log.request
                request.model_spec.name = name
                request.model_spec.signature_name = "serving_uint8"
                request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(batch))
                response = entry.predict_log.response
                response.model_spec.name = name
                response.model_spec.version.value = version
                probs = answers[name][begin:begin + FACES_PER_REQUEST]
                response.outputs["probabilities"].CopyFrom(tf.make_tensor_proto(probs))
                writer.write(entry.SerializeToString())
                records += 1
    return records


# ----------------------------------------------------------------------------- the streams

def fresh_stream(count: int, seed: int) -> np.ndarray:
    """New faces drawn like the test split (FER-2013's class mix) with generator `seed`."""
    rng = np.random.default_rng(seed)
    return draw_faces(labels_like_fer(count, rng), rng)


def replay(faces: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of `faces` in a random order (the test split served again)."""
    return faces[np.random.default_rng(seed).permutation(len(faces))[:count]]


def brightness_shift(faces: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(faces.astype(np.int32) + levels, 0, 255).astype(np.uint8)


def contrast_change(faces: np.ndarray, factor: float) -> np.ndarray:
    flat = faces.reshape(len(faces), -1).astype(np.float32)
    mean = flat.mean(axis=1, keepdims=True)
    return np.clip(np.rint((flat - mean) * factor + mean), 0, 255).astype(
        np.uint8).reshape(faces.shape)


def class_mix_shift(faces: np.ndarray, labels: np.ndarray, count: int, seed: int,
                    favoured: str, share: float) -> np.ndarray:
    """`count` faces resampled from `faces` so that `favoured` makes up `share` of them and
    the other classes keep FER-2013's proportions among the rest."""
    rng = np.random.default_rng(seed)
    rest = {name: n for name, n in FER_CLASS_COUNTS.items() if name != favoured}
    shares = {name: (1 - share) * n / sum(rest.values()) for name, n in rest.items()}
    shares[favoured] = share
    wanted = labels_like_fer(count, rng, shares)
    chosen = [rng.choice(np.flatnonzero(labels == k)) for k in wanted]
    return faces[np.array(chosen)]


# ----------------------------------------------------------------------------- lineage

def record_lineage(run_root: str, run: ServedRun, serving_root: str) -> None:
    """ML Metadata as a pipeline run that pushed the served versions records it (the same
    executions, artifact types and event names as pipeline/runner.py), without running it."""
    from fer_pipeline.core.artifacts import fingerprint
    from fer_pipeline.core.config import MetadataConfig
    from fer_pipeline.pipeline.metadata import DERIVED, ArtifactRecord, MetadataStore

    store = MetadataStore(MetadataConfig(), run_root, run_id="monitor-test")
    ref = run.reference

    def artifact(kind: str, uri: str) -> ArtifactRecord:
        return ArtifactRecord(kind, uri, fingerprint(uri))

    def record(step: str, inputs: dict, outputs: dict, execution_dir: str) -> None:
        store.record_execution(step, inputs, outputs, {
            "cache_key": step, "code_fingerprint": "sha256:" + "0" * 64,
            "parameters": {}, "result": {}, "duration_s": 0.0,
            "execution_dir": execution_dir})

    examples = artifact("examples", ref.examples_dir)
    statistics_dir = artifact("statistics", ref.statistics_dir)
    anomalies = ArtifactRecord("anomalies", os.path.join(run_root, "anomalies"), "sha256:a")
    augmented = ArtifactRecord("augmented", os.path.join(run_root, "augmented"), "sha256:b")
    transform = ArtifactRecord("transform", os.path.join(run_root, "transform"), "sha256:c")
    schema = ArtifactRecord("schema", "schemas/fer2013/schema.pbtxt", "sha256:d")
    evaluation_dir = next(iter(ref.evaluations.values()))
    evaluation = artifact("evaluation", evaluation_dir)
    record("ingest", {}, {"examples": [examples]}, ref.examples_dir)
    record("augment", {"examples": [examples]}, {"augmented": [augmented]}, augmented.uri)
    record("statistics", {"examples": [examples], "augmented": [augmented]},
           {"statistics": [statistics_dir]}, ref.statistics_dir)
    record("validate", {"statistics": [statistics_dir], "schema": [schema]},
           {"anomalies": [anomalies]}, anomalies.uri)
    record("transform", {"augmented": [augmented], "examples": [examples],
                         "anomalies": [anomalies]}, {"transform": [transform]}, transform.uri)
    runs = {}
    for name in MODELS:
        runs[name] = ArtifactRecord("model_run", os.path.dirname(run.models[name]) + "/" +
                                    name, fingerprint(run.models[name]))
        record(f"train-{name}", {"transform": [transform]}, {"model_run": [runs[name]]},
               runs[name].uri)
    record("evaluate", {"examples": [examples],
                        **{f"model_{n}": [r] for n, r in runs.items()}},
           {"evaluation": [evaluation]}, evaluation_dir)
    pushed = [ArtifactRecord("pushed_model", os.path.join(serving_root, name, str(version)),
                             fingerprint(run.models[name]),
                             {"model": name, "version": version, "serving_root": serving_root})
              for name, version in MODELS.items()]
    record("push", {"evaluation": [evaluation], **{f"model_{n}": [r] for n, r in runs.items()}},
           {"push": [ArtifactRecord("push", os.path.join(run_root, "push"), "sha256:e")],
            DERIVED: pushed}, os.path.join(run_root, "push"))
