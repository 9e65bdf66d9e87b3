"""StatisticsGen on small hand-written TFRecords (ExampleGen's output format)."""
from __future__ import annotations

import base64
import os
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import statistics_pb2

from components.statistics import (STATISTICS_HTML, STATISTICS_FILE, pixels_as_int_lists,
                                   present_splits, run_statistics)
from pipeline.contract import (FEATURE_AUGMENTATION, FEATURE_LABEL, FEATURE_PIXELS,
    FEATURE_ROW, FEATURE_SOURCE_ROW, FEATURE_USAGE, NUM_PIXELS)

ALL_FEATURES = (FEATURE_LABEL, FEATURE_PIXELS, FEATURE_USAGE, FEATURE_ROW, FEATURE_SOURCE_ROW,
                FEATURE_AUGMENTATION)
USAGE_OF = {"train": b"Training", "validation": b"PublicTest", "test": b"PrivateTest"}


def make_example(label: int, pixels: bytes, usage: bytes, row: int,
                 drop: Sequence[str] = ()) -> bytes:
    """One raw example in ExampleGen's format, minus the features named in `drop`."""
    features = {
        FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_PIXELS: tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels])),
        FEATURE_USAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[usage])),
        FEATURE_ROW: tf.train.Feature(int64_list=tf.train.Int64List(value=[row])),
        FEATURE_SOURCE_ROW: tf.train.Feature(int64_list=tf.train.Int64List(value=[row])),
        FEATURE_AUGMENTATION: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[b"original"])),
    }
    for name in drop:
        del features[name]
    return tf.train.Example(
        features=tf.train.Features(feature=features)).SerializeToString()


def write_split(examples_dir: str, split: str, labels: Sequence[int], seed: int = 0,
                pixel_counts: Optional[dict[int, int]] = None,
                drop: Sequence[str] = (), usage: Optional[bytes] = None) -> None:
    """Writes `len(labels)` examples of random faces into examples_dir/split, 2 shards.

    `pixel_counts` maps an example index to a wrong pixel count for that example; `usage`
    defaults to the split's FER-2013 Usage value. The
    first image is all 0 and the second all 255, so the pixel range is exactly 0..255.
    """
    rng = np.random.default_rng(seed)
    pixel_counts = pixel_counts or {}
    usage = USAGE_OF.get(split, b"") if usage is None else usage
    os.makedirs(os.path.join(examples_dir, split), exist_ok=True)
    shards = [tf.io.TFRecordWriter(os.path.join(examples_dir, split,
                                                f"examples-{i:05d}-of-00002.tfrecord"))
              for i in range(2)]
    for i, label in enumerate(labels):
        image = rng.integers(1, 255, pixel_counts.get(i, NUM_PIXELS), dtype=np.uint8)
        if i < 2:
            image[:] = 0 if i == 0 else 255
        row = 2 + i
        shards[i % 2].write(make_example(int(label), image.tobytes(), usage, row, drop))
    for shard in shards:
        shard.close()


def balanced_labels(count: int) -> list[int]:
    return [i % 7 for i in range(count)]


def feature_stats(stats: statistics_pb2.DatasetFeatureStatisticsList,
                  name: str) -> statistics_pb2.FeatureNameStatistics:
    return tfdv.get_feature_stats(stats.datasets[0], tfdv.FeaturePath([name]))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    examples = str(root / "examples")
    write_split(examples, "train", balanced_labels(140), seed=1)
    write_split(examples, "validation", balanced_labels(70), seed=2)
    write_split(examples, "test", balanced_labels(70), seed=3)
    os.makedirs(os.path.join(examples, "rejected"))  # ExampleGen's non-split directory
    result = run_statistics(examples, str(root / "statistics"), ["--runner=DirectRunner"])
    return result, str(root / "statistics")


def test_one_statistics_file_per_split_with_example_counts(clean_run):
    result, out = clean_run
    assert result.splits == ["train", "validation", "test"]
    assert result.num_examples == {"train": 140, "validation": 70, "test": 70}
    for split in result.splits:
        path = os.path.join(out, split, STATISTICS_FILE)
        assert result.stats_paths[split] == path
        assert tfdv.load_statistics(path).datasets[0].num_examples == result.num_examples[split]
    # Beam's empty temp directories are cleaned up; only the statistics remain.
    assert sorted(os.listdir(out)) == sorted([STATISTICS_HTML, "train", "validation", "test"])
    assert os.listdir(os.path.join(out, "train")) == [STATISTICS_FILE]


def test_pixels_are_counted_and_ranged_as_integers(clean_run):
    result, _ = clean_run
    stats = tfdv.load_statistics(result.stats_paths["train"])
    pixels = feature_stats(stats, FEATURE_PIXELS)
    assert pixels.type == statistics_pb2.FeatureNameStatistics.INT
    common = pixels.num_stats.common_stats
    assert (common.min_num_values, common.max_num_values) == (NUM_PIXELS, NUM_PIXELS)
    assert common.tot_num_values == 140 * NUM_PIXELS
    assert (pixels.num_stats.min, pixels.num_stats.max) == (0, 255)


def test_label_statistics_are_categorical_counts(clean_run):
    result, _ = clean_run
    stats = tfdv.load_statistics(result.stats_paths["validation"])
    buckets = feature_stats(stats, FEATURE_LABEL).string_stats.rank_histogram.buckets
    assert {b.label: b.sample_count for b in buckets} == {str(k): 10 for k in range(7)}


def test_other_features_are_kept(clean_run):
    result, _ = clean_run
    assert sorted(result.features) == sorted(ALL_FEATURES)


def test_html_page_shows_every_split_and_feature(clean_run):
    result, out = clean_run
    page = open(os.path.join(out, STATISTICS_HTML)).read()
    assert result.html_path == os.path.join(out, STATISTICS_HTML)
    for name in ALL_FEATURES + ("train: 140 examples", "validation: 70", "test: 70"):
        assert name in page
    # The Facets view embeds all three splits, not only the two TFDV's helper compares.
    embedded = re.search(r'proto-input="([A-Za-z0-9+/=]+)"', page).group(1)
    facets = statistics_pb2.DatasetFeatureStatisticsList.FromString(base64.b64decode(embedded))
    assert [d.name for d in facets.datasets] == ["train", "validation", "test"]


def test_pixel_decoding_keeps_wrong_lengths_and_missing_rows():
    column = pa.array([[b"\x00\xff\x07"], None, [b"\x01", b"\x02"], []],
                      type=pa.large_list(pa.large_binary()))
    decoded = pixels_as_int_lists(column).to_pylist()
    assert decoded == [[0, 255, 7], None, [1, 2], []]


def test_no_split_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    assert present_splits(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError, match="no split"):
        run_statistics(str(tmp_path), str(tmp_path / "out"), [])
