"""The statistics page's numbers and faces: label counts and pixel summaries from TFDV's
statistics, faces read from the examples (samples per class, mean faces, duplicates,
augmented copies beside their originals), and ExampleGen's rejected rows, duplicates and
counts. `build_page` gathers them and hands them to the renderer (page.py); the
statistics themselves are computed in executor.py.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import (CLASS_NAMES, DUPLICATES_FILE, EXAMPLES_PATTERN,
    FEATURE_AUGMENTATION, FEATURE_LABEL, FEATURE_PIXELS, FEATURE_ROW, FEATURE_SOURCE_ROW,
    IMAGE_SIZE, MANIFEST_FILE, NUM_CLASSES, NUM_PIXELS, REJECTED_DIR, REJECTED_FILE)
from fer_pipeline.core.fer_csv import reason_code
from fer_pipeline.components.statistics.ferplus import ferplus_agreement

ORIGINAL = b"original"
# The augmented split, as the statistics step names it under output_dir/augmented/.
AUGMENTED_SPLIT = "train"
# Faces on the page: reading a split's examples in the driver is bounded so the page costs
# seconds on FER-2013 (28,709 train faces fit under the bound) and stays bounded on more.
MAX_SCANNED_EXAMPLES = 40_000
SAMPLES_PER_CLASS = 8
MAX_DUPLICATES_SHOWN = 12
MAX_REJECTED_SHOWN = 12
AUGMENTED_PAIRS_PER_CLASS = 3


# ----------------------------------------------------------------------------- numbers

def label_counts(stats: statistics_pb2.DatasetFeatureStatisticsList) -> dict[str, int]:
    """Examples per class name, from TFDV's categorical counts of `emotion`."""
    counts = {name: 0 for name in CLASS_NAMES}
    feature = _feature(stats, FEATURE_LABEL)
    for bucket in feature.string_stats.rank_histogram.buckets if feature else []:
        if bucket.label.isdigit() and int(bucket.label) < NUM_CLASSES:
            counts[CLASS_NAMES[int(bucket.label)]] = int(bucket.sample_count)
    return counts


def pixel_summary(stats: statistics_pb2.DatasetFeatureStatisticsList) -> dict[str, Any]:
    """Pixel mean, spread and TFDV's equal-width intensity histogram (pixel counts)."""
    feature = _feature(stats, FEATURE_PIXELS)
    if feature is None or not feature.HasField("num_stats"):
        return {"mean": None, "std_dev": None, "histogram": []}
    numbers = feature.num_stats
    standard = [h for h in numbers.histograms
                if h.type == statistics_pb2.Histogram.STANDARD]
    buckets = standard[0].buckets if standard else []
    return {"mean": numbers.mean, "std_dev": numbers.std_dev,
            "min": numbers.min, "max": numbers.max,
            "histogram": [{"low": b.low_value, "high": b.high_value,
                           "count": b.sample_count} for b in buckets]}


def feature_rows(stats: statistics_pb2.DatasetFeatureStatisticsList) -> list[dict[str, Any]]:
    """One summary per feature (type, presence, values per example, range, unique)."""
    rows = []
    for feature in stats.datasets[0].features:
        which = feature.WhichOneof("stats")
        common = getattr(feature, which).common_stats if which else None
        rows.append({
            "feature": ".".join(feature.path.step) or feature.name,
            "type": statistics_pb2.FeatureNameStatistics.Type.Name(feature.type),
            "present": int(common.num_non_missing) if common else None,
            "missing": int(common.num_missing) if common else None,
            "values_per_example": (f"{common.min_num_values}..{common.max_num_values}"
                                   if common else ""),
            "min": feature.num_stats.min if which == "num_stats" else None,
            "max": feature.num_stats.max if which == "num_stats" else None,
            "unique": int(feature.string_stats.unique) if which == "string_stats" else None,
        })
    return rows


def _feature(stats: statistics_pb2.DatasetFeatureStatisticsList,
             name: str) -> Optional[statistics_pb2.FeatureNameStatistics]:
    for feature in stats.datasets[0].features:
        if tuple(feature.path.step) == (name,) or feature.name == name:
            return feature
    return None


# ----------------------------------------------------------------------------- faces

@dataclass
class FaceRecord:
    label: int
    row: int
    source_row: int
    augmentation: bytes
    pixels: np.ndarray          # uint8 [48, 48]


def read_faces(pattern: str, limit: int = MAX_SCANNED_EXAMPLES) -> Iterator[FaceRecord]:
    """The examples matching `pattern`, in file order, at most `limit`; rows whose pixels
    are not 2,304 bytes are skipped (the schema check reports them)."""
    import tensorflow as tf

    files = fileio.glob(pattern)
    if not files:
        return
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
            FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string, default_value=b""),
            FEATURE_ROW: tf.io.FixedLenFeature([], tf.int64, default_value=0),
            FEATURE_SOURCE_ROW: tf.io.FixedLenFeature([], tf.int64, default_value=0),
            FEATURE_AUGMENTATION: tf.io.FixedLenFeature([], tf.string, default_value=ORIGINAL)}
    dataset = tf.data.TFRecordDataset(files).take(limit).batch(1024).map(
        lambda batch: tf.io.parse_example(batch, spec))
    for batch in dataset.as_numpy_iterator():
        for i in range(len(batch[FEATURE_LABEL])):
            raw = batch[FEATURE_PIXELS][i]
            label = int(batch[FEATURE_LABEL][i])
            if len(raw) != NUM_PIXELS or not 0 <= label < NUM_CLASSES:
                continue
            yield FaceRecord(label, int(batch[FEATURE_ROW][i]), int(batch[FEATURE_SOURCE_ROW][i]),
                             bytes(batch[FEATURE_AUGMENTATION][i]),
                             np.frombuffer(raw, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))


@dataclass
class SplitFaces:
    """What the page shows of one split's faces."""
    scanned: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_PIXELS)))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    samples: dict[int, list[FaceRecord]] = field(
        default_factory=lambda: {k: [] for k in range(NUM_CLASSES)})
    by_row: dict[int, np.ndarray] = field(default_factory=dict)  # the rows asked for

    def mean_faces(self) -> dict[int, np.ndarray]:
        return {k: (self.sums[k] / self.counts[k]).round().astype(np.uint8).reshape(
            IMAGE_SIZE, IMAGE_SIZE) for k in range(NUM_CLASSES) if self.counts[k]}


def scan_split(pattern: str, wanted_rows: set[int] = frozenset(),
               limit: int = MAX_SCANNED_EXAMPLES) -> SplitFaces:
    """Mean face per class over the first `limit` examples, the first samples per class,
    and the pixels of `wanted_rows` (duplicates to show) when they are among them."""
    faces = SplitFaces()
    for record in read_faces(pattern, limit):
        faces.scanned += 1
        faces.sums[record.label] += record.pixels.reshape(-1)
        faces.counts[record.label] += 1
        if len(faces.samples[record.label]) < SAMPLES_PER_CLASS:
            faces.samples[record.label].append(record)
        if record.row in wanted_rows:
            faces.by_row[record.row] = record.pixels
    return faces


def augmented_pairs(pattern: str, per_class: int = AUGMENTED_PAIRS_PER_CLASS,
                    limit: int = MAX_SCANNED_EXAMPLES) -> list[tuple[FaceRecord, FaceRecord]]:
    """(original, copy) pairs: the first copies of each class and the originals they were
    made from (two bounded passes: copies first, then their sources)."""
    copies: dict[int, list[FaceRecord]] = {k: [] for k in range(NUM_CLASSES)}
    for record in read_faces(pattern, limit):
        if record.augmentation != ORIGINAL and len(copies[record.label]) < per_class:
            copies[record.label].append(record)
    wanted = {c.source_row for found in copies.values() for c in found}
    originals: dict[int, FaceRecord] = {}
    for record in read_faces(pattern, limit):
        if record.augmentation == ORIGINAL and record.row in wanted:
            originals[record.row] = record
            if len(originals) == len(wanted):
                break
    return [(originals[c.source_row], c) for k in range(NUM_CLASSES) for c in copies[k]
            if c.source_row in originals]


# ----------------------------------------------------------------------------- ingest files

def read_rejected(examples_dir: str) -> list[dict[str, str]]:
    path = fileio.join(examples_dir, REJECTED_DIR, REJECTED_FILE)
    if not fileio.exists(path):
        return []
    return list(csv.DictReader(io.StringIO(fileio.read_text(path), newline="")))


def read_duplicates(examples_dir: str) -> Optional[dict[str, Any]]:
    path = fileio.join(examples_dir, DUPLICATES_FILE)
    return fileio.read_json(path) if fileio.exists(path) else None


def read_ingest_counts(examples_dir: str) -> Optional[dict[str, Any]]:
    """ExampleGen's counts from the manifest the runner writes beside its output."""
    path = fileio.join(examples_dir, MANIFEST_FILE)
    if not fileio.exists(path):
        return None
    result = fileio.read_json(path).get("result") or {}
    keys = ("rows_read", "rows_written", "rows_rejected", "cross_split_duplicates",
            "duplicate_rows_removed", "within_split_duplicate_rows", "split_mode")
    return {k: result[k] for k in keys if k in result} or None


def rejected_summary(rejected: list[dict[str, str]]) -> dict[str, Any]:
    by_reason: dict[str, int] = {}
    for row in rejected:
        code = reason_code(row["reason"])
        by_reason[code] = by_reason.get(code, 0) + 1
    return {"total": len(rejected), "by_reason": dict(sorted(by_reason.items())),
            # An image has no line number: its file (source) is shown instead.
            "shown": [{"line_number": int(r["line_number"]) if r["line_number"] else
                       r.get("source", ""), "reason": r["reason"],
                       "raw_line": _shorten(r.get("raw_line") or "", 90)}
                      for r in rejected[:MAX_REJECTED_SHOWN]]}


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _duplicate_face_rows(duplicates: Optional[dict[str, Any]]) -> dict[str, set[int]]:
    """split -> row numbers whose pixels show each displayed duplicate (the kept copy)."""
    wanted: dict[str, set[int]] = {}
    for entry in (duplicates or {}).get("duplicates", [])[:MAX_DUPLICATES_SHOWN]:
        keeper = _kept_row(entry)
        wanted.setdefault(keeper["split"], set()).add(int(keeper["line_number"]))
    return wanted


def _kept_row(entry: dict[str, Any]) -> dict[str, Any]:
    kept_in = entry.get("kept_in")
    for row in entry["rows"]:
        if row["split"] == kept_in:
            return row
    return entry["rows"][0]


# ----------------------------------------------------------------------------- the page

def build_page(examples_dir: str,
               stats: dict[str, statistics_pb2.DatasetFeatureStatisticsList],
               augmented_dir: Optional[str],
               augmented_stats: Optional[statistics_pb2.DatasetFeatureStatisticsList],
               verdict: dict[str, Any]) -> str:
    """Gathers the page's numbers (`data`, embedded in the page) and faces, and renders."""
    # Imported here: rendering needs matplotlib, the statistics themselves do not.
    from fer_pipeline.components.statistics.page import render_statistics_page

    duplicates = read_duplicates(examples_dir)
    wanted = _duplicate_face_rows(duplicates)
    data: dict[str, Any] = {"validation": verdict, "splits": {},
                            "ingest": read_ingest_counts(examples_dir),
                            "rejected": rejected_summary(read_rejected(examples_dir)),
                            "limits": {"max_scanned_examples": MAX_SCANNED_EXAMPLES,
                                       "samples_per_class": SAMPLES_PER_CLASS}}
    faces: dict[str, np.ndarray] = {}
    rows_seen: dict[str, dict[int, np.ndarray]] = {}
    for split, split_stats in stats.items():
        scanned = scan_split(fileio.join(examples_dir, split, EXAMPLES_PATTERN),
                             wanted.get(split, set()))
        rows_seen[split] = scanned.by_row
        data["splits"][split] = _split_data(split, split_stats, scanned, faces)
    data["duplicates"] = _duplicates_data(duplicates, rows_seen, faces)
    data["ferplus"] = ferplus_agreement(examples_dir, list(stats))
    data["augmented"] = (_augmented_data(augmented_dir, augmented_stats, stats.get("train"),
                                         faces) if augmented_stats is not None else None)
    return render_statistics_page(data, faces)


def _split_data(split: str, stats: statistics_pb2.DatasetFeatureStatisticsList,
                scanned: SplitFaces, faces: dict[str, np.ndarray]) -> dict[str, Any]:
    for k, mean in scanned.mean_faces().items():
        faces[f"mean/{split}/{k}"] = mean
    samples = {}
    for k, records in scanned.samples.items():
        samples[CLASS_NAMES[k]] = [r.row for r in records]
        for i, record in enumerate(records):
            faces[f"sample/{split}/{k}/{i}"] = record.pixels
    return {"num_examples": int(stats.datasets[0].num_examples),
            "labels": label_counts(stats), "pixels": pixel_summary(stats),
            "features": feature_rows(stats), "scanned": scanned.scanned,
            "mean_face_counts": {CLASS_NAMES[k]: int(scanned.counts[k])
                                 for k in range(NUM_CLASSES)},
            "sample_rows": samples}


def _duplicates_data(duplicates: Optional[dict[str, Any]],
                     rows_seen: dict[str, dict[int, np.ndarray]],
                     faces: dict[str, np.ndarray]) -> Optional[dict[str, Any]]:
    if duplicates is None:
        return None
    shown = []
    for i, entry in enumerate(duplicates.get("duplicates", [])[:MAX_DUPLICATES_SHOWN]):
        keeper = _kept_row(entry)
        pixels = rows_seen.get(keeper["split"], {}).get(int(keeper["line_number"]))
        if pixels is not None:
            faces[f"duplicate/{i}"] = pixels
        shown.append({"rows": entry["rows"], "kept_in": entry.get("kept_in"),
                      "removed_line_numbers": entry.get("removed_line_numbers", []),
                      "face": pixels is not None})
    return {"images": int(duplicates.get("cross_split_duplicate_images", len(shown))),
            "rows_removed": int(duplicates.get("rows_removed", 0)),
            "policy": duplicates.get("policy", ""), "shown": shown}


def _augmented_data(augmented_dir: str,
                    stats: statistics_pb2.DatasetFeatureStatisticsList,
                    train_stats: Optional[statistics_pb2.DatasetFeatureStatisticsList],
                    faces: dict[str, np.ndarray]) -> dict[str, Any]:
    pairs = augmented_pairs(fileio.join(augmented_dir, AUGMENTED_SPLIT, EXAMPLES_PATTERN))
    shown = []
    for i, (original, copy) in enumerate(pairs):
        faces[f"augmented/{i}/original"] = original.pixels
        faces[f"augmented/{i}/copy"] = copy.pixels
        shown.append({"class_name": CLASS_NAMES[copy.label], "source_row": copy.source_row,
                      "augmentation": copy.augmentation.decode("utf-8", "replace")})
    return {"num_examples": int(stats.datasets[0].num_examples),
            "labels_before": label_counts(train_stats) if train_stats is not None else None,
            "labels_after": label_counts(stats), "pairs": shown}
