"""The training input: the Transform step's TFRecords as a tf.data pipeline (no Python
generator): a deterministic parallel interleave, vectorized parsing in batches, an
in-memory cache after the first epoch, a seeded per-example shuffle, re-batching and
prefetch. The trainer and the tuner both train on it (components never import each other,
so the input they share lives here). Under multi-worker training each worker reads its own shard of the data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_FERPLUS_TARGET, FEATURE_IMAGE,
                                        FEATURE_LABEL, FERPLUS_FILE, NUM_CLASSES, NUM_PIXELS,
                                        TRANSFORMED_DIR)
from fer_pipeline.core.errors import MissingInputError

__all__ = ["PARSE_BATCH", "TARGETS", "TRANSFORMED_FEATURE_SPEC", "Targets", "count_records",
           "make_dataset", "read_targets", "shard_by_data", "split_pattern"]

# Records are parsed this many at a time (one vectorized parse_example per batch).
PARSE_BATCH = 1024
TRANSFORMED_FEATURE_SPEC = {
    FEATURE_IMAGE: tf.io.FixedLenFeature([NUM_PIXELS], tf.float32),
    FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


# What a model is trained against (TARGETS): "label" the transformed `emotion` (FER-2013's
# label, or FER+'s majority), "draw" a label drawn from the FER+ vote distribution afresh
# every epoch (Barsoum et al.'s probabilistic label drawing), "distribution" the vote
# distribution itself as a soft target (categorical cross-entropy).
TARGETS = ("label", "draw", "distribution")
_TARGET_OF_MODE = {"majority": "label", "probability": "draw", "crossentropy": "distribution"}


@dataclass(frozen=True)
class Targets:
    """What a transform output trains: the class count and the target (TARGETS)."""
    num_classes: int = NUM_CLASSES
    target: str = "label"
    ferplus: dict = field(default_factory=dict)   # the transform's ferplus.json, if any

    @property
    def soft(self) -> bool:
        return self.target == "distribution"


def read_targets(transform_dir: str) -> Targets:
    """From the transform output: FER+'s mode and classes when ingest joined votes, else
    FER-2013's seven labels."""
    path = fileio.join(transform_dir, FERPLUS_FILE)
    if not fileio.exists(path):
        return Targets()
    ferplus = fileio.read_json(path)
    return Targets(int(ferplus["classes"]), _TARGET_OF_MODE[ferplus["mode"]], ferplus)


def make_dataset(file_pattern: str, batch_size: int, *, training: bool, seed: int,
                 shuffle_buffer: int = 0, max_examples: int = 0,
                 drop_remainder: bool = False, num_examples: int = 0,
                 targets: Targets = Targets()) -> tf.data.Dataset:
    """(image float32 [b, 2304], label int64 [b]) batches straight from TFRecords; with
    `targets.soft` the second element is float32 [b, classes] instead.

    `num_examples` (after the `max_examples` cap), when known, is declared as the
    dataset's cardinality so Keras knows the steps per epoch from the first epoch on.
    "draw" draws only while `training`; validation keeps FER+'s majority as the label.
    """
    files = tf.data.Dataset.list_files(file_pattern, shuffle=False)  # sorted: reproducible
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if max_examples:
        # A fixed random subset (same every epoch): files may be ordered by class or by
        # augmentation, so the first N records would not be representative.
        ds = ds.shuffle(max(shuffle_buffer, 1), seed=seed, reshuffle_each_iteration=False)
        ds = ds.take(max_examples)
    parse = functools.partial(_parse_batch, targets=targets)
    ds = ds.batch(PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
    # Parsed float tensors are cached, so only the first epoch reads and parses files.
    ds = ds.cache().unbatch()
    if training and shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if targets.target == "draw":
        ds = _draw_labels(ds, seed, training)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if num_examples:
        batches = (num_examples // batch_size if drop_remainder
                   else -(-num_examples // batch_size))
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(tf.data.AUTOTUNE)


def _parse_batch(serialized: tf.Tensor, targets: Targets
                 ) -> tuple[tf.Tensor, tf.Tensor] | tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
    with_distribution = targets.target != "label"
    spec = dict(TRANSFORMED_FEATURE_SPEC)
    if with_distribution:
        spec[FEATURE_FERPLUS_TARGET] = tf.io.FixedLenFeature([targets.num_classes], tf.float32)
    features = tf.io.parse_example(serialized, spec)
    if targets.soft:
        return features[FEATURE_IMAGE], features[FEATURE_FERPLUS_TARGET]
    if with_distribution:   # "draw": both, until the label is drawn
        return features[FEATURE_IMAGE], (features[FEATURE_LABEL],
                                         features[FEATURE_FERPLUS_TARGET])
    return features[FEATURE_IMAGE], features[FEATURE_LABEL]


def _draw_labels(ds: tf.data.Dataset, seed: int, training: bool) -> tf.data.Dataset:
    """(image, (majority, distribution)) -> (image, label): while training, a label drawn
    from the distribution, differently every epoch (the random stream is re-seeded each
    iteration) yet reproducibly (its seed is `seed`); otherwise the majority."""
    if not training:
        return ds.map(lambda image, both: (image, both[0]))
    randomness = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def draw(example, stream):
        image, (_, distribution) = example
        logits = tf.math.log(distribution[tf.newaxis, :])
        label = tf.random.stateless_categorical(logits, 1, seed=[stream, seed], dtype=tf.int64)
        return image, label[0, 0]

    return tf.data.Dataset.zip((ds, randomness)).map(draw, num_parallel_calls=tf.data.AUTOTUNE,
                                                     deterministic=True)


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
    # A split may be a single file, so shard by element, not by file, across workers.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)


def count_records(file_pattern: str) -> int:
    files = fileio.glob(file_pattern)
    if not files:
        raise MissingInputError(f"no transformed examples match {file_pattern}")
    return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))


def split_pattern(transform_dir: str, split: str) -> str:
    return fileio.join(transform_dir, TRANSFORMED_DIR, split, EXAMPLES_PATTERN)
