"""The training input: the Transform step's TFRecords as a tf.data pipeline (no Python
generator): a deterministic parallel interleave, vectorized parsing in batches, an
in-memory cache after the first epoch, a seeded per-example shuffle, re-batching and
prefetch. The trainer and the tuner both train on it (components never import each other,
so the input they share lives here). Under multi-worker training each worker reads its own shard of the data.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_IMAGE, FEATURE_LABEL, NUM_PIXELS,
                                        TRANSFORMED_DIR)
from fer_pipeline.core.errors import MissingInputError

__all__ = ["PARSE_BATCH", "TRANSFORMED_FEATURE_SPEC", "count_records", "make_dataset",
           "shard_by_data", "split_pattern"]

# Records are parsed this many at a time (one vectorized parse_example per batch).
PARSE_BATCH = 1024
TRANSFORMED_FEATURE_SPEC = {
    FEATURE_IMAGE: tf.io.FixedLenFeature([NUM_PIXELS], tf.float32),
    FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


def make_dataset(file_pattern: str, batch_size: int, *, training: bool, seed: int,
                 shuffle_buffer: int = 0, max_examples: int = 0,
                 drop_remainder: bool = False, num_examples: int = 0) -> tf.data.Dataset:
    """(image float32 [b, 2304], label int64 [b]) batches straight from TFRecords.

    `num_examples` (after the `max_examples` cap), when known, is declared as the
    dataset's cardinality so Keras knows the steps per epoch from the first epoch on.
    """
    files = tf.data.Dataset.list_files(file_pattern, shuffle=False)  # sorted: reproducible
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=tf.data.AUTOTUNE,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if max_examples:
        # A fixed random subset (same every epoch): files may be ordered by class or by
        # augmentation, so the first N records would not be representative.
        ds = ds.shuffle(max(shuffle_buffer, 1), seed=seed, reshuffle_each_iteration=False)
        ds = ds.take(max_examples)
    ds = ds.batch(PARSE_BATCH).map(_parse_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
    # Parsed float tensors are cached, so only the first epoch reads and parses files.
    ds = ds.cache().unbatch()
    if training and shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if num_examples:
        batches = (num_examples // batch_size if drop_remainder
                   else -(-num_examples // batch_size))
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(tf.data.AUTOTUNE)


def _parse_batch(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    features = tf.io.parse_example(serialized, TRANSFORMED_FEATURE_SPEC)
    return features[FEATURE_IMAGE], features[FEATURE_LABEL]


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
