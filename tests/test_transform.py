"""Transform: full-pass training statistics, applied identically to every split and at serving."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components import transform
from fer_pipeline.core.config import TransformConfig
from fer_pipeline.core.contract import (FEATURE_AUGMENTATION, FEATURE_IMAGE, FEATURE_LABEL,
    FEATURE_PIXELS, FEATURE_ROW, FEATURE_SOURCE_ROW, FEATURE_USAGE, NUM_PIXELS)

TRANSFORMED_SPEC = {
    FEATURE_IMAGE: tf.io.FixedLenFeature([NUM_PIXELS], tf.float32),
    FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


def write_raw_examples(directory: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    """Writes ExampleGen-shaped raw examples (the contract's six features), one shard."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "examples-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i, (image, label) in enumerate(zip(pixels, labels)):
            feature = {
                FEATURE_LABEL: _int(label), FEATURE_PIXELS: _bytes(image.tobytes()),
                FEATURE_USAGE: _bytes(b"Training"), FEATURE_ROW: _int(i + 2),
                FEATURE_SOURCE_ROW: _int(i + 2), FEATURE_AUGMENTATION: _bytes(b"original"),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


def _int(value) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def read_transformed(directory: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(tf.io.gfile.glob(os.path.join(directory, "examples-*.tfrecord")))
    records = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    parsed = tf.io.parse_example(records, TRANSFORMED_SPEC)
    return parsed[FEATURE_IMAGE].numpy(), parsed[FEATURE_LABEL].numpy()


def lexsorted(rows: np.ndarray) -> np.ndarray:
    """Rows in lexicographic order: an increasing affine map keeps that order, so raw and
    transformed rows line up without a key (the runner may reorder examples)."""
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Training pixels spread over 0..255; validation and test deliberately darker and
    brighter, so their own statistics differ clearly from the training ones."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(3)
    data = {
        "train": rng.integers(0, 256, (40, NUM_PIXELS), dtype=np.uint8),
        "validation": rng.integers(20, 90, (12, NUM_PIXELS), dtype=np.uint8),
        "test": rng.integers(150, 240, (9, NUM_PIXELS), dtype=np.uint8),
    }
    labels = {split: np.arange(len(p)) % 7 for split, p in data.items()}
    write_raw_examples(str(root / "augmented" / "train"), data["train"], labels["train"])
    for split in ("validation", "test"):
        write_raw_examples(str(root / "examples" / split), data[split], labels[split])
    return {"root": root, "pixels": data, "labels": labels}


def _run(raw, name: str, normalization: str, beam_args=()) -> transform.TransformResult:
    root = raw["root"]
    return transform.run_transform(str(root / "augmented"), str(root / "examples"),
                                   str(root / name), TransformConfig(normalization),
                                   list(beam_args))


@pytest.fixture(scope="module")
def zscore(raw):
    return _run(raw, "zscore", "zscore")


def test_counts_paths_and_statistics(raw, zscore):
    assert zscore.counts == {"train": 40, "validation": 12, "test": 9}
    train = raw["pixels"]["train"].astype(np.float64)
    # tft.var is the population variance; float32 round trip through the graph.
    assert zscore.offset == pytest.approx(train.mean(), rel=1e-5)
    assert zscore.scale == pytest.approx(train.std(), rel=1e-4)
    assert os.path.isdir(os.path.join(zscore.transform_graph_dir, "transform_fn"))
    assert not os.path.exists(os.path.join(raw["root"], "zscore", ".tft_tmp"))


def test_train_images_have_zero_mean_unit_std(zscore):
    images, _ = read_transformed(zscore.transformed_dirs["train"])
    assert images.shape == (40, NUM_PIXELS) and images.dtype == np.float32
    assert abs(images.mean()) < 1e-4
    assert images.std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_splits_use_training_statistics(raw, zscore, split):
    images, labels = read_transformed(zscore.transformed_dirs[split])
    pixels = raw["pixels"][split].astype(np.float64)
    train = raw["pixels"]["train"].astype(np.float64)
    expected = (pixels - train.mean()) / train.std()
    np.testing.assert_allclose(lexsorted(images), lexsorted(expected), atol=1e-4)
    # With their own statistics they would be centred at 0; these splits are not.
    assert abs(images.mean()) > 0.5
    assert sorted(labels.tolist()) == sorted(raw["labels"][split].tolist())


def test_serving_batch_with_pixels_only_matches_transformed_records(raw, zscore):
    """The trainer calls the transform layer with {'pixels'} alone; `emotion` must not be
    needed, and the numbers must be the ones the model was trained on."""
    images, _ = read_transformed(zscore.transformed_dirs["validation"])
    served = transform.apply_to_pixels(zscore.transform_graph_dir,
                                       raw["pixels"]["validation"].reshape(-1, 48, 48))
    assert served.shape == (12, NUM_PIXELS)
    np.testing.assert_allclose(lexsorted(served), lexsorted(images), atol=1e-6)


def test_minmax_and_scale255(raw):
    minmax = _run(raw, "minmax", "minmax")
    images, _ = read_transformed(minmax.transformed_dirs["train"])
    assert images.min() == pytest.approx(0.0, abs=1e-6)
    assert images.max() == pytest.approx(1.0, abs=1e-6)
    assert (minmax.offset, minmax.scale) == pytest.approx((0.0, 255.0), abs=1e-3)

    scaled = _run(raw, "scale255", "scale255")
    images, _ = read_transformed(scaled.transformed_dirs["test"])
    expected = raw["pixels"]["test"].astype(np.float64) / 255.0
    np.testing.assert_allclose(lexsorted(images), lexsorted(expected), atol=1e-6)


def test_unknown_normalization_is_rejected(raw):
    with pytest.raises(ValueError, match="normalization"):
        _run(raw, "bad", "standardize")


def test_missing_split_is_reported(raw, tmp_path):
    with pytest.raises(FileNotFoundError, match="validation"):
        transform.run_transform(str(raw["root"] / "augmented"), str(tmp_path),
                                str(tmp_path / "out"), TransformConfig(), [])


def test_multi_processing_runner_gives_same_outputs(raw, zscore):
    """preprocessing_fn and every pickled function must be importable by worker processes."""
    multi = _run(raw, "multi", "zscore",
                 ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert multi.counts == zscore.counts
    # Workers sum float32 partial statistics in another order: equal up to rounding.
    assert (multi.offset, multi.scale) == pytest.approx((zscore.offset, zscore.scale), rel=1e-5)
    for split in ("train", "test"):
        mine, _ = read_transformed(multi.transformed_dirs[split])
        reference, _ = read_transformed(zscore.transformed_dirs[split])
        np.testing.assert_allclose(lexsorted(mine), lexsorted(reference), atol=1e-5)
