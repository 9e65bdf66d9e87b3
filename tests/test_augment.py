"""Augment: exact class balancing, determinism, lineage, and the image transforms."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components import augment
from fer_pipeline.components.augment import AugmentParams
from fer_pipeline.core.config import AugmentConfig
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_AUGMENTATION, FEATURE_LABEL,
    FEATURE_PIXELS, FEATURE_ROW, FEATURE_SOURCE_ROW, FEATURE_USAGE, NUM_PIXELS)

# Originals per class; neutral (6) has none, to check that it is reported, not a crash.
CLASS_COUNTS = (9, 2, 4, 6, 3, 5, 0)
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def raw_example(label: int, row: int, pixels: np.ndarray) -> bytes:
    feature = {
        FEATURE_LABEL: _int(label), FEATURE_PIXELS: _bytes(pixels.tobytes()),
        FEATURE_USAGE: _bytes(b"Training"), FEATURE_ROW: _int(row),
        FEATURE_SOURCE_ROW: _int(row), FEATURE_AUGMENTATION: _bytes(b"original"),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _int(value) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def write_shards(directory, records: list[bytes], shards: int = 1) -> None:
    os.makedirs(directory, exist_ok=True)
    for shard in range(shards):
        path = os.path.join(directory, f"examples-{shard:05d}-of-{shards:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for record in records[shard::shards]:
                writer.write(record)


def read_records(directory: str) -> list[bytes]:
    files = sorted(tf.io.gfile.glob(os.path.join(directory, "examples-*.tfrecord")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files)]


def fields(record: bytes) -> dict:
    f = tf.train.Example.FromString(record).features.feature
    return {
        "label": f[FEATURE_LABEL].int64_list.value[0],
        "row": f[FEATURE_ROW].int64_list.value[0],
        "source_row": f[FEATURE_SOURCE_ROW].int64_list.value[0],
        "augmentation": f[FEATURE_AUGMENTATION].bytes_list.value[0].decode(),
        "pixels": np.frombuffer(f[FEATURE_PIXELS].bytes_list.value[0], np.uint8),
    }


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    """Random (so never symmetric) images, labels in CLASS_COUNTS, rows 2.. as in a CSV."""
    rng = np.random.default_rng(11)
    labels = [label for label, n in enumerate(CLASS_COUNTS) for _ in range(n)]
    rng.shuffle(labels)
    return [raw_example(label, row, rng.integers(0, 256, NUM_PIXELS, dtype=np.uint8))
            for row, label in enumerate(labels, start=2)]


@pytest.fixture(scope="module")
def balanced(originals, tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    write_shards(root / "examples" / "train", originals)
    result = augment.run_augment(str(root / "examples"), str(root / "out"), AugmentConfig(), [])
    return result, read_records(result.train_dir)


def test_every_class_is_topped_up_to_the_largest_exactly(balanced):
    result, records = balanced
    largest = max(CLASS_COUNTS)
    assert result.target_per_class == largest
    assert result.counts_before == dict(zip(CLASS_NAMES, CLASS_COUNTS))
    expected_after = {name: (largest if n else 0) for name, n in zip(CLASS_NAMES, CLASS_COUNTS)}
    assert result.counts_after == expected_after
    written = collections.Counter(fields(r)["label"] for r in records)
    assert {CLASS_NAMES[label]: n for label, n in written.items()} == {
        name: n for name, n in expected_after.items() if n}
    assert result.augmented == len(records) - sum(CLASS_COUNTS)
    assert result.warnings == [
        f"class 6 (neutral) has no training examples; it cannot be topped up to {largest}"]
    assert not os.path.exists(os.path.join(os.path.dirname(result.train_dir),
                                           augment.SUMMARY_DIR))


def test_originals_pass_through_unchanged(originals, balanced):
    _, records = balanced
    kept = [r for r in records if fields(r)["augmentation"] == "original"]
    assert sorted(kept) == sorted(originals)


def test_lineage_copies_come_from_originals_of_the_same_class(originals, balanced):
    _, records = balanced
    class_of_row = {fields(r)["row"]: fields(r)["label"] for r in originals}
    pixels_of_row = {fields(r)["row"]: fields(r)["pixels"] for r in originals}
    copies = [fields(r) for r in records if fields(r)["augmentation"] != "original"]
    assert copies
    for copy in copies:
        assert class_of_row[copy["source_row"]] == copy["label"]
        assert copy["row"] == copy["source_row"]  # a copy has no CSV line of its own
        assert copy["pixels"].shape == (NUM_PIXELS,)
        assert not np.array_equal(copy["pixels"], pixels_of_row[copy["source_row"]])
    # Copies are spread over the class's originals (k mod n), not all made from one.
    disgust_sources = {c["source_row"] for c in copies if c["label"] == 1}
    assert len(disgust_sources) == CLASS_COUNTS[1]


def test_each_copy_is_reproducible_from_its_tag(originals, balanced):
    _, records = balanced
    config = AugmentConfig()
    pixels_of_row = {fields(r)["row"]: fields(r)["pixels"] for r in originals}
    for copy in (fields(r) for r in records):
        if copy["augmentation"] == "original":
            continue
        k = int(copy["augmentation"].split(",")[0].removeprefix("copy:"))
        params = augment.draw_params(config.seed, copy["source_row"], k, config)
        assert params.tag(k) == copy["augmentation"]
        again = augment.augment_image(pixels_of_row[copy["source_row"]].reshape(48, 48), params)
        np.testing.assert_array_equal(again.reshape(-1), copy["pixels"])


def test_deterministic_across_input_order_and_parallelism(originals, balanced, tmp_path):
    """Same seed, inputs shuffled over 3 shards, 2 worker processes: identical examples."""
    _, reference = balanced
    shuffled = list(originals)
    np.random.default_rng(5).shuffle(shuffled)
    write_shards(tmp_path / "examples" / "train", shuffled, shards=3)
    result = augment.run_augment(str(tmp_path / "examples"), str(tmp_path / "out"),
                                 AugmentConfig(), MULTI_PROCESS)
    assert sorted(read_records(result.train_dir)) == sorted(reference)


def test_another_seed_gives_other_copies(originals, balanced, tmp_path):
    _, reference = balanced
    write_shards(tmp_path / "examples" / "train", originals)
    result = augment.run_augment(str(tmp_path / "examples"), str(tmp_path / "out"),
                                 AugmentConfig(seed=7), [])
    records = read_records(result.train_dir)
    assert len(records) == len(reference)
    assert set(records) != set(reference)


def test_explicit_target_tops_up_but_never_cuts(originals, tmp_path):
    write_shards(tmp_path / "examples" / "train", originals)
    result = augment.run_augment(str(tmp_path / "examples"), str(tmp_path / "out"),
                                 AugmentConfig(target_per_class=5), [])
    expected = {name: (max(n, 5) if n else 0) for name, n in zip(CLASS_NAMES, CLASS_COUNTS)}
    assert result.target_per_class == 5
    assert result.counts_after == expected
    assert len(read_records(result.train_dir)) == sum(expected.values())


def test_disabled_writes_originals_only(originals, tmp_path):
    write_shards(tmp_path / "examples" / "train", originals)
    result = augment.run_augment(str(tmp_path / "examples"), str(tmp_path / "out"),
                                 AugmentConfig(enabled=False), [])
    assert sorted(read_records(result.train_dir)) == sorted(originals)
    assert result.augmented == 0 and result.warnings == []
    assert result.counts_after == result.counts_before


def test_missing_training_split_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        augment.run_augment(str(tmp_path), str(tmp_path / "out"), AugmentConfig(), [])


# --- The image transforms ------------------------------------------------------------------

@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)


def test_identity_params_leave_the_image_alone(image):
    same = augment.augment_image(image, AugmentParams(flip=False, angle=0.0, dx=0, dy=0))
    np.testing.assert_array_equal(same, image)


def test_flip_mirrors_left_and_right(image):
    flipped = augment.augment_image(image, AugmentParams(flip=True, angle=0.0, dx=0, dy=0))
    assert flipped.shape == (48, 48) and flipped.dtype == np.uint8
    np.testing.assert_array_equal(flipped, image[:, ::-1])


def test_shift_moves_pixels_and_replicates_the_border(image):
    shifted = augment.augment_image(image, AugmentParams(flip=False, angle=0.0, dx=2, dy=-1))
    np.testing.assert_array_equal(shifted[:-1, 2:], image[1:, :-2])
    np.testing.assert_array_equal(shifted[:-1, 0], image[1:, 0])  # left edge replicated


def test_rotation_changes_the_image_but_not_its_size(image):
    rotated = augment.augment_image(image, AugmentParams(flip=False, angle=7.3, dx=0, dy=0))
    assert rotated.shape == (48, 48) and rotated.dtype == np.uint8
    assert rotated.size == NUM_PIXELS
    assert not np.array_equal(rotated, image)
    # Positive angles turn counter-clockwise about the centre: +90 is numpy's rot90.
    quarter = augment.augment_image(image, AugmentParams(flip=False, angle=90.0, dx=0, dy=0))
    np.testing.assert_array_equal(quarter, np.rot90(image))


def test_drawn_parameters_stay_within_the_configured_bounds():
    config = AugmentConfig(max_rotation_degrees=10.0, max_shift_pixels=2, horizontal_flip=False)
    drawn = [augment.draw_params(42, row, k, config) for row in range(2, 12) for k in range(20)]
    assert all(abs(p.angle) <= 10.0 and abs(p.dx) <= 2 and abs(p.dy) <= 2 for p in drawn)
    assert not any(p.flip for p in drawn)
    assert len({p.angle for p in drawn}) > 50  # actually random, not a constant
    flips = [augment.draw_params(42, row, 0, AugmentConfig()).flip for row in range(200)]
    assert 60 < sum(flips) < 140
    assert drawn[0] == augment.draw_params(42, 2, 0, config)
