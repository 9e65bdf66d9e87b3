"""The training reference: what the served versions were trained and evaluated on.

The caller finds the directories (through lineage); this module reads them once into a
LoadedReference: the train split's statistics (image features and pixels), the checked-in
schema with the image features added, and each model's answers on the test split.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from fer_pipeline.components.monitor.answers import (Answers, answer_columns,
    answers_from_probabilities, merged_statistics)
from fer_pipeline.components.monitor.features import (CATEGORICAL_FEATURES, IMAGE_FEATURES,
    feature_stats, image_features, statistics)
from fer_pipeline.core import fileio
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_PIXELS, IMAGE_SIZE,
    STATISTICS_FILE, TEST_PREDICTIONS_FILE)
from fer_pipeline.core.errors import UserError

__all__ = ["TRAIN_SPLIT", "SERVING_ENVIRONMENT", "MonitorError", "MonitorReference",
           "LoadedReference", "read_train_faces", "read_test_predictions", "face_schema",
           "load_reference"]

TRAIN_SPLIT = "train"
SERVING_ENVIRONMENT = "SERVING"


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
            self.answer_stats[key] = merged_statistics(
                {k: v for k, v in self.answer_groups.items() if k in key})
        return self.answer_stats[key]


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
    pixel_stats = feature_stats(tfdv.load_statistics(path), FEATURE_PIXELS)
    if pixel_stats is None:
        raise MonitorError(f"{path} has no {FEATURE_PIXELS!r} statistics")
    stats.datasets[0].features.add().CopyFrom(pixel_stats)
    return stats, len(faces)


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


def _test_answers(reference: MonitorReference, models: Sequence[str],
                  tolerance: float) -> tuple[Answers, int]:
    """Each model's answers on the test split, and how many faces that split has (0 when
    the models were evaluated on different splits)."""
    probs = {m: read_test_predictions(reference.evaluations[m], m) for m in models}
    lengths = {len(p) for p in probs.values()}
    if len(lengths) > 1:
        # Versions evaluated on different test splits: no common ensemble to compare with.
        answers = Answers({m: p.argmax(axis=1) for m, p in probs.items()},
                          {m: p.max(axis=1).astype(np.float64) for m, p in probs.items()},
                          None, {m: int(p.shape[1]) for m, p in probs.items()})
    else:
        answers = answers_from_probabilities(probs, tolerance)
    return answers, lengths.pop() if len(lengths) == 1 else 0


def load_reference(reference: MonitorReference, schema_path: str, config: MonitorConfig,
                   tie_tolerance: float, models: Sequence[str]) -> LoadedReference:
    """Everything the window is compared with, read once (a scheduler judging many
    windows of one served version can keep it)."""
    train_stats, train_faces = _train_statistics(reference, config)
    answers, test_faces = _test_answers(reference, models, tie_tolerance)
    return LoadedReference(train_stats, train_faces, face_schema(schema_path, config), answers,
                           answer_columns(answers), test_faces)
