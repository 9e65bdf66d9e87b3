"""The test split in memory: every model (and the served versions) sees the same examples in
the same order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_FERPLUS_VOTES, FEATURE_LABEL,
    FEATURE_PIXELS, FEATURE_ROW, FERPLUS_VOTE_ORDER, IMAGE_SIZE, NUM_CLASSES)
from fer_pipeline.core.errors import InputDataError, MissingInputError

__all__ = ["TEST_SPLIT", "TestSplit", "load_test_split"]

TEST_SPLIT = "test"


@dataclass
class TestSplit:
    """The test split in memory, in file order (every model sees the same examples)."""
    serialized: list[bytes]
    labels: np.ndarray       # int64 [n]
    rows: np.ndarray         # int64 [n], the CSV line numbers
    pixels: np.ndarray       # uint8 [n, 48, 48]
    files: list[str]
    votes: Optional[np.ndarray] = None   # int64 [n, 10] FER+ votes, when ingest joined them


def _test_files(examples_dir: str) -> list[str]:
    files = fileio.glob(fileio.join(examples_dir, TEST_SPLIT, EXAMPLES_PATTERN))
    if not files:
        raise MissingInputError(f"no test TFRecords under {examples_dir}/{TEST_SPLIT}")
    return files


def load_test_split(examples_dir: str) -> TestSplit:
    """All serialized test examples with their labels, row numbers and pixels.

    The test split of FER-2013 is ~3,600 images (~9 MB), so holding it in memory lets every
    model (and the served versions) see exactly the same examples in the same order.
    """
    import tensorflow as tf

    files = _test_files(examples_dir)
    serialized = [record.numpy() for record in tf.data.TFRecordDataset(files)]
    if not serialized:
        raise InputDataError(f"the test split under {examples_dir}/{TEST_SPLIT} is empty")
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_ROW: tf.io.FixedLenFeature([], tf.int64, default_value=0),
            FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string),
            # -1s where an example has no FER+ votes (a run without them).
            FEATURE_FERPLUS_VOTES: tf.io.FixedLenFeature(
                [len(FERPLUS_VOTE_ORDER)], tf.int64, default_value=[-1] * len(FERPLUS_VOTE_ORDER))}
    labels, rows, pixels, votes = [], [], [], []
    for start in range(0, len(serialized), 4096):
        parsed = tf.io.parse_example(serialized[start:start + 4096], spec)
        labels.append(parsed[FEATURE_LABEL].numpy())
        rows.append(parsed[FEATURE_ROW].numpy())
        pixels.append(np.stack([np.frombuffer(raw, np.uint8) for raw in
                                parsed[FEATURE_PIXELS].numpy()]))
        votes.append(parsed[FEATURE_FERPLUS_VOTES].numpy())
    label_array = np.concatenate(labels).astype(np.int64)
    if label_array.min() < 0 or label_array.max() >= NUM_CLASSES:
        raise InputDataError(f"test labels outside 0..{NUM_CLASSES - 1} in {examples_dir}/test")
    vote_array = np.concatenate(votes)
    return TestSplit(serialized, label_array, np.concatenate(rows).astype(np.int64),
                     np.concatenate(pixels).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), files,
                     None if (vote_array < 0).any() else vote_array)
