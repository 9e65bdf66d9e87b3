"""StatisticsGen on small hand-written TFRecords (ExampleGen's output format)."""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.components.statistics.executor import (STATISTICS_HTML, STATISTICS_FILE, pixels_as_int_lists,
                                   present_splits, run_statistics)
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_AUGMENTATION, FEATURE_LABEL, FEATURE_PIXELS,
    FEATURE_ROW, FEATURE_SOURCE, FEATURE_SOURCE_ROW, FEATURE_USAGE, NUM_PIXELS)

ALL_FEATURES = (FEATURE_LABEL, FEATURE_PIXELS, FEATURE_USAGE, FEATURE_ROW, FEATURE_SOURCE_ROW,
                FEATURE_AUGMENTATION, FEATURE_SOURCE)
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
        FEATURE_SOURCE: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[f"data.csv:{row}".encode()])),
    }
    for name in drop:
        del features[name]
    return tf.train.Example(
        features=tf.train.Features(feature=features)).SerializeToString()


def write_split(examples_dir: str, split: str, labels: Sequence[int], seed: int = 0,
                pixel_counts: Optional[dict[int, int]] = None,
                drop: Sequence[str] = (), usage: Optional[bytes] = None,
                extremes: bool = True) -> None:
    """Writes `len(labels)` examples of random faces into examples_dir/split, 2 shards.

    `pixel_counts` maps an example index to a wrong pixel count for that example; `usage`
    defaults to the split's FER-2013 Usage value. With `extremes` the first image is all 0
    and the second all 255, so the pixel range is exactly 0..255.
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
        if extremes and i < 2:
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


def write_augmented(augmented_dir: str, examples_dir: str, copies_of_class: int,
                    copies: int) -> list[tuple[int, bytes]]:
    """augmented/train: the train split's originals plus `copies` horizontally flipped
    copies of class `copies_of_class` (as components/augment.py tags them). Returns
    (source_row, copy pixels) per copy."""
    os.makedirs(os.path.join(augmented_dir, "train"), exist_ok=True)
    originals = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(
        sorted(tf.io.gfile.glob(os.path.join(examples_dir, "train", "examples-*"))))]
    made = []
    path = os.path.join(augmented_dir, "train", "examples-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for example in originals:
            writer.write(example.SerializeToString())
        sources = [e for e in originals
                   if e.features.feature[FEATURE_LABEL].int64_list.value[0] == copies_of_class]
        for k in range(copies):
            source = sources[k % len(sources)]
            row = source.features.feature[FEATURE_ROW].int64_list.value[0]
            pixels = np.frombuffer(source.features.feature[FEATURE_PIXELS].bytes_list.value[0],
                                   np.uint8).reshape(48, 48)[:, ::-1].tobytes()
            copy = tf.train.Example.FromString(make_example(copies_of_class, pixels,
                                                            b"Training", row))
            copy.features.feature[FEATURE_AUGMENTATION].bytes_list.value[:] = [
                f"copy:{k},flip".encode()]
            writer.write(copy.SerializeToString())
            made.append((row, pixels))
    return made


def write_ingest_reports(examples_dir: str) -> None:
    """ExampleGen's rejected rows and duplicates.json: test row 3 repeats train row 2."""
    os.makedirs(os.path.join(examples_dir, "rejected"), exist_ok=True)
    with open(os.path.join(examples_dir, "rejected", "rejected_rows.csv"), "w") as f:
        f.write("line_number,reason,raw_line\n"
                "400,wrong_pixel_count: got 3 want 2304,\"0,1 2 3,Training\"\n"
                "401,bad_label: 9,\"9,0 0,Training\"\n"
                "402,wrong_pixel_count: got 1 want 2304,\"0,7,Training\"\n"
                "403,duplicate_of_train_row:2,\n")
    with open(os.path.join(examples_dir, "duplicates.json"), "w") as f:
        json.dump({"cross_split_duplicate_images": 1, "rows_removed": 1,
                   "policy": "keep the copy in the earliest split", "duplicates": [
                       {"pixels_sha1": "x", "rows": [{"line_number": 2, "split": "train"},
                                                     {"line_number": 403, "split": "test"}],
                        "kept_in": "train", "removed_line_numbers": [403]}]}, f)


AUGMENTED_COPIES = 12


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    examples = str(root / "examples")
    write_split(examples, "train", balanced_labels(140), seed=1)
    write_split(examples, "validation", balanced_labels(70), seed=2)
    write_split(examples, "test", balanced_labels(70), seed=3)
    write_ingest_reports(examples)  # also ExampleGen's non-split directory, rejected/
    augmented = str(root / "augmented")
    copies = write_augmented(augmented, examples, copies_of_class=1, copies=AUGMENTED_COPIES)
    result = run_statistics(examples, augmented, SCHEMA, str(root / "statistics"), None,
                            ["--runner=DirectRunner"])
    return result, str(root / "statistics"), copies


SCHEMA = os.path.join(os.path.dirname(__file__), "..", "schemas", "fer2013", "schema.pbtxt")


def page_source(page: str) -> dict:
    """The numbers the statistics page embeds as its source (html_page.document)."""
    return json.loads(re.search(r'<script type="application/json" data-source="page">(.*?)'
                                r"</script>", page, re.S).group(1))


def test_one_statistics_file_per_split_with_example_counts(clean_run):
    result, out, _ = clean_run
    assert result.splits == ["train", "validation", "test"]
    assert result.num_examples == {"train": 140, "validation": 70, "test": 70}
    for split in result.splits:
        path = os.path.join(out, split, STATISTICS_FILE)
        assert result.stats_paths[split] == path
        assert tfdv.load_statistics(path).datasets[0].num_examples == result.num_examples[split]
    # Beam's empty temp directories are cleaned up; only the statistics remain.
    assert sorted(os.listdir(out)) == sorted([STATISTICS_HTML, "train", "validation", "test",
                                              "augmented"])
    assert os.listdir(os.path.join(out, "train")) == [STATISTICS_FILE]


def test_pixels_are_counted_and_ranged_as_integers(clean_run):
    result, _, _ = clean_run
    stats = tfdv.load_statistics(result.stats_paths["train"])
    pixels = feature_stats(stats, FEATURE_PIXELS)
    assert pixels.type == statistics_pb2.FeatureNameStatistics.INT
    common = pixels.num_stats.common_stats
    assert (common.min_num_values, common.max_num_values) == (NUM_PIXELS, NUM_PIXELS)
    assert common.tot_num_values == 140 * NUM_PIXELS
    assert (pixels.num_stats.min, pixels.num_stats.max) == (0, 255)


def test_label_statistics_are_categorical_counts(clean_run):
    result, _, _ = clean_run
    stats = tfdv.load_statistics(result.stats_paths["validation"])
    buckets = feature_stats(stats, FEATURE_LABEL).string_stats.rank_histogram.buckets
    assert {b.label: b.sample_count for b in buckets} == {str(k): 10 for k in range(7)}


def test_other_features_are_kept(clean_run):
    result, _, _ = clean_run
    assert sorted(result.features) == sorted(ALL_FEATURES)


def test_page_numbers_come_from_tfdv_statistics(clean_run):
    result, out, _ = clean_run
    page = open(os.path.join(out, STATISTICS_HTML)).read()
    source = page_source(page)
    assert result.html_path == os.path.join(out, STATISTICS_HTML)
    for split in result.splits:
        stats = tfdv.load_statistics(result.stats_paths[split])
        data = source["splits"][split]
        assert data["num_examples"] == stats.datasets[0].num_examples
        buckets = feature_stats(stats, FEATURE_LABEL).string_stats.rank_histogram.buckets
        assert data["labels"] == {CLASS_NAMES[int(b.label)]: b.sample_count for b in buckets}
        pixels = feature_stats(stats, FEATURE_PIXELS).num_stats
        standard = [h for h in pixels.histograms
                    if h.type == statistics_pb2.Histogram.STANDARD][0]
        assert data["pixels"]["histogram"] == [
            {"low": b.low_value, "high": b.high_value, "count": b.sample_count}
            for b in standard.buckets]
        assert sum(b["count"] for b in data["pixels"]["histogram"]) == pytest.approx(
            stats.datasets[0].num_examples * NUM_PIXELS)
        assert data["pixels"]["mean"] == pytest.approx(pixels.mean)
        # Every face was scanned (the split is under the bound): the mean faces' counts
        # are the label counts.
        assert data["mean_face_counts"] == data["labels"]
        assert {f["feature"] for f in data["features"]} == set(ALL_FEATURES)
    # No Facets, nothing loaded from elsewhere: every src/href is inline.
    assert "facets" not in page.lower()
    assert all(u.startswith("data:") for u in re.findall(r'(?:src|href)="([^"]*)"', page))


def test_page_has_the_validation_verdict_rejected_rows_and_duplicates(clean_run):
    result, out, _ = clean_run
    source = page_source(open(os.path.join(out, STATISTICS_HTML)).read())
    verdict = source["validation"]
    assert verdict["checked"] and not verdict["problems"]
    assert verdict["summary"] == result.validation_summary == "no anomalies, no label drift"
    assert set(verdict["drift"]) == {"validation", "test"}
    assert source["rejected"]["total"] == 4
    assert source["rejected"]["by_reason"] == {"bad_label": 1, "duplicate_of_train_row": 1,
                                               "wrong_pixel_count": 2}
    duplicates = source["duplicates"]
    assert (duplicates["images"], duplicates["rows_removed"]) == (1, 1)
    assert duplicates["shown"][0]["face"] is True     # train row 2 was found and shown


def test_augmented_split_counts_and_pairs(clean_run):
    from fer_pipeline.core.data_checks import load_split_statistics

    result, out, copies = clean_run
    source = page_source(open(os.path.join(out, STATISTICS_HTML)).read())
    augmented = source["augmented"]
    stats = tfdv.load_statistics(result.augmented_stats_path)
    assert augmented["num_examples"] == stats.datasets[0].num_examples == 140 + AUGMENTED_COPIES
    assert augmented["labels_before"] == {c: 20 for c in CLASS_NAMES}
    assert augmented["labels_after"] == {**{c: 20 for c in CLASS_NAMES},
                                         CLASS_NAMES[1]: 20 + AUGMENTED_COPIES}
    # The first copies of class 1, each beside the original its source_row names.
    pairs = augmented["pairs"]
    assert [p["source_row"] for p in pairs] == [row for row, _ in copies[:len(pairs)]]
    assert pairs[0]["augmentation"] == "copy:0,flip" and pairs[0]["class_name"] == CLASS_NAMES[1]
    # The validate step reads <split>/stats.tfrecord only: the augmented split is not a split.
    assert list(load_split_statistics(out)) == ["train", "validation", "test"]


def test_verdict_reports_anomalies_and_drift(tmp_path):
    from fer_pipeline.components.statistics.executor import validation_verdict
    from fer_pipeline.core.config import ValidationConfig

    examples = str(tmp_path / "examples")
    write_split(examples, "train", balanced_labels(70), seed=1)
    write_split(examples, "test", [3] * 40 + balanced_labels(30), seed=2,
                pixel_counts={5: 100})
    result = run_statistics(examples, None, SCHEMA, str(tmp_path / "statistics"), None, [])
    stats = {s: tfdv.load_statistics(p) for s, p in result.stats_paths.items()}
    verdict = validation_verdict(stats, SCHEMA, ValidationConfig())
    assert verdict["problems"] and verdict["blocking"]
    assert FEATURE_PIXELS in verdict["anomalies"]["test"]
    assert verdict["drift"]["test"]["drifted"] is True
    assert result.validation_summary == verdict["summary"]
    assert verdict["summary"].startswith("BLOCKING: test: anomalies in ")
    assert "label drift L-inf" in verdict["summary"]
    missing = validation_verdict(stats, str(tmp_path / "nope.pbtxt"), ValidationConfig())
    assert missing == {"checked": False, "schema": str(tmp_path / "nope.pbtxt"),
                       "summary": f"not checked: no schema at {tmp_path / 'nope.pbtxt'}"}


def test_pixel_decoding_keeps_wrong_lengths_and_missing_rows():
    column = pa.array([[b"\x00\xff\x07"], None, [b"\x01", b"\x02"], []],
                      type=pa.large_list(pa.large_binary()))
    decoded = pixels_as_int_lists(column).to_pylist()
    assert decoded == [[0, 255, 7], None, [1, 2], []]


def test_no_split_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    assert present_splits(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError, match="no split"):
        run_statistics(str(tmp_path), None, None, str(tmp_path / "out"), None, [])


def test_augmentation_tags_split_into_steps_for_captions():
    from fer_pipeline.components.statistics.page import augmentation_steps

    assert augmentation_steps("copy:12,flip,rotate:+7.3,shift:(1,-2)") == [
        "copy:12", "flip", "rotate:+7.3", "shift:(1,-2)"]
    assert augmentation_steps("copy:0") == ["copy:0"]


def test_statistics_on_an_object_store_match_a_local_run(s3, clean_run, tmp_path):
    """The run root on s3:// (moto): same statistics and the same page numbers."""
    from fer_pipeline.core import fileio

    result, out, _ = clean_run
    local_root = os.path.dirname(out)
    examples, augmented = s3.unique_uri("examples"), s3.unique_uri("augmented")
    fileio.copytree(os.path.join(local_root, "examples"), examples)
    fileio.copytree(os.path.join(local_root, "augmented"), augmented)
    remote = run_statistics(examples, augmented, SCHEMA, s3.unique_uri("statistics"), None,
                            s3.beam_args)
    assert remote.num_examples == result.num_examples
    assert remote.html_path.startswith("s3://")
    local_source = page_source(open(result.html_path).read())
    remote_source = page_source(fileio.read_text(remote.html_path))
    for split in result.splits:
        assert remote_source["splits"][split]["labels"] == local_source["splits"][split]["labels"]
        assert remote_source["splits"][split]["sample_rows"] == \
            local_source["splits"][split]["sample_rows"]
    assert remote_source["augmented"]["pairs"] == local_source["augmented"]["pairs"]
    assert remote_source["rejected"] == local_source["rejected"]
