"""StatisticsGen: TFDV statistics for every split ExampleGen wrote, in one Beam pipeline.

Reads `<examples_dir>/<split>/examples-*.tfrecord`, writes `<output_dir>/<split>/stats.tfrecord`
(a `DatasetFeatureStatisticsList`, readable with `tfdv.load_statistics`) and
`<output_dir>/statistics.html`, the page a person reads (components/statistics/page.py).
With `augmented_dir`, the augmented training split's statistics go to
`<output_dir>/augmented/train/stats.tfrecord` (one level deeper than the splits, so the
validate step, which reads `<split>/stats.tfrecord`, does not mistake it for a split).

The page's numbers come from TFDV's statistics (label counts, pixel histogram, mean and
spread), ExampleGen's rejected rows, duplicates and manifest, and the same schema and drift
checks the validate step runs. Faces (samples per class, mean faces, duplicates, augmented
copies beside their originals) come from reading the examples themselves, bounded by
MAX_SCANNED_EXAMPLES per split.

Why statistics are computed over a *decoded view* of the examples: ExampleGen stores
`pixels` as one bytes value (2,304 raw uint8), and on a single bytes value TFDV can only
count bytes values, not check them. The checked-in schema must be able to say "pixels has
exactly 2,304 values, all in 0..255", so before the statistics generators run each batch's
`pixels` column is rewritten as an int64 list holding one value per byte. A row whose
pixels have the wrong length keeps its wrong length, so the schema's value_count catches it.

Cost, and why we kept the full decoded view: decoding makes TFDV look at 2,304 numbers
per example (83 M for the whole of FER-2013). Measured on this 2-core machine with Beam's
in-process DirectRunner, 35,887 random 48x48 examples (28,709/3,589/3,589) took 17.6 s
wall (22.3 s while other jobs shared the cores) for reading, decoding, statistics of all
three splits and writing: 6-7 % of the data half's 5-minute budget. That is cheap enough
that we did not fall back to derived per-example features (pixel_min/pixel_max/pixel_count),
which would check the same count and range but lose the pixel histogram and quantiles.
Re-measured with the augmented training split (62,923 examples of a full-size synthetic
FER-2013 after balancing) and the page: the whole step took 26.9 s wall while two other
engineers' jobs shared the cores, of which building the page (reading the faces of every
split, the mean faces, the augmented pairs, charts) took 1.8 s; the augmented split's
statistics are most of the increase.
The only generators we keep off are the semantic-domain ones (image / natural-language
detection, off by default), which would sniff every bytes value and tell us nothing the
schema does not already say.
"""
from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2
from tfx_bsl.coders import example_coder

from fer_pipeline.core import data_checks as checks
from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import ValidationConfig, resolve_schema_path
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_LABEL, FEATURE_PIXELS, NUM_CLASSES, SPLITS,
                                       STATISTICS_FILE, STATISTICS_HTML)
from fer_pipeline.components.statistics.page_data import build_page
from fer_pipeline.core.errors import MissingInputError

__all__ = ["run_statistics", "StatisticsResult"]

log = logging.getLogger(__name__)

# TFDV's statistics generators vectorize over Arrow record batches; ~1,000 examples of
# 2,304 int64 pixels is ~18 MB per batch, big enough to amortize per-batch overhead.
MIN_BATCH_SIZE = 64
MAX_BATCH_SIZE = 1000
# Where the augmented training split's statistics go, under output_dir.
AUGMENTED_STATS_DIR = "augmented"
AUGMENTED_SPLIT = "train"


@dataclass
class StatisticsResult:
    splits: list[str]
    num_examples: dict[str, int]
    stats_paths: dict[str, str]
    html_path: str
    duration_s: float = 0.0
    features: list[str] = field(default_factory=list)
    augmented_stats_path: Optional[str] = None
    validation_summary: Optional[str] = None


def run_statistics(examples_dir: str, augmented_dir: Optional[str], schema_path: Optional[str],
                   output_dir: str, validation: Optional[ValidationConfig],
                   beam_args: list[str]) -> StatisticsResult:
    """Computes TFDV statistics for each split present under `examples_dir` (and the
    augmented training split under `augmented_dir`), and renders the statistics page.

    `schema_path` and `validation` are what the validate step uses (defaults:
    ValidationConfig()); the page shows the verdict those checks give.
    """
    started = time.time()
    splits = present_splits(examples_dir)
    if not splits:
        raise MissingInputError(
            f"no split with {EXAMPLES_PATTERN} files under {examples_dir}; expected "
            f"subdirectories among {list(SPLITS)}")
    inputs = {split: fileio.join(examples_dir, split, EXAMPLES_PATTERN) for split in splits}
    stats_paths = {split: fileio.join(output_dir, split, STATISTICS_FILE) for split in splits}
    augmented_path = None
    if augmented_dir is not None:
        augmented_path = fileio.join(output_dir, AUGMENTED_STATS_DIR, AUGMENTED_SPLIT,
                                     STATISTICS_FILE)
        inputs[AUGMENTED_STATS_DIR] = fileio.join(augmented_dir, AUGMENTED_SPLIT,
                                                  EXAMPLES_PATTERN)
        if not fileio.glob(inputs[AUGMENTED_STATS_DIR]):
            raise MissingInputError(f"no {EXAMPLES_PATTERN} under {augmented_dir}/train")
    outputs = {**stats_paths, **({AUGMENTED_STATS_DIR: augmented_path} if augmented_path
                                 else {})}
    _compute_statistics(inputs, outputs, beam_args)
    _remove_empty_beam_temp_dirs(output_dir)

    stats = {split: _load_named(stats_paths[split], split) for split in splits}
    augmented_stats = (_load_named(augmented_path, "train (augmented)")
                       if augmented_path else None)
    validation = validation or ValidationConfig()
    verdict = validation_verdict(
        stats, schema_path or resolve_schema_path(validation.schema_path), validation)
    html_path = fileio.join(output_dir, STATISTICS_HTML)
    fileio.write_text(html_path, build_page(examples_dir, stats, augmented_dir,
                                            augmented_stats, verdict))
    log.info("statistics for %s in %.1f s", ", ".join(splits), time.time() - started)
    return StatisticsResult(
        splits=splits,
        num_examples={s: int(stats[s].datasets[0].num_examples) for s in splits},
        stats_paths=stats_paths,
        html_path=html_path,
        duration_s=round(time.time() - started, 3),
        features=sorted({f.path.step[0] for s in stats.values()
                         for f in s.datasets[0].features}),
        augmented_stats_path=augmented_path,
        validation_summary=verdict.get("summary"),
    )


def _compute_statistics(inputs: dict[str, str], outputs: dict[str, str],
                        beam_args: list[str]) -> None:
    """One Beam pipeline: read, decode the pixels view, TFDV statistics, write, per input."""
    for path in outputs.values():
        fileio.makedirs(_parent(path))
    options = _stats_options()
    with beam_pipeline(beam_args, "statistics") as pipeline:
        for name, pattern in inputs.items():
            _ = (pipeline
                 | f"Read[{name}]" >> beam.io.ReadFromTFRecord(pattern)
                 | f"Batch[{name}]" >> beam.BatchElements(
                     min_batch_size=MIN_BATCH_SIZE, max_batch_size=MAX_BATCH_SIZE)
                 | f"DecodeView[{name}]" >> beam.Map(decode_examples_batch)
                 | f"Stats[{name}]" >> tfdv.GenerateStatistics(options)
                 | f"Write[{name}]" >> tfdv.WriteStatisticsToTFRecord(outputs[name]))


def _parent(path: str) -> str:
    return posixpath.dirname(path) if fileio.is_uri(path) else os.path.dirname(path)


def present_splits(examples_dir: str) -> list[str]:
    """Known splits first, in pipeline order, then any other split directory, sorted."""
    found = {path.replace("\\", "/").rstrip("/").split("/")[-2]
             for path in fileio.glob(fileio.join(examples_dir, "*", EXAMPLES_PATTERN))}
    return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))


def stats_hint_schema() -> schema_pb2.Schema:
    """The little TFDV must know while computing statistics: `emotion` is categorical.

    Without it an int label gets only numeric statistics, and TFDV's L-infinity drift
    comparator needs the per-value counts that categorical statistics carry.
    """
    schema = schema_pb2.Schema()
    label = schema.feature.add(name=FEATURE_LABEL, type=schema_pb2.INT)
    label.int_domain.min = 0
    label.int_domain.max = NUM_CLASSES - 1
    label.int_domain.is_categorical = True
    return schema


def _stats_options() -> tfdv.StatsOptions:
    # Semantic-domain generators (image / natural-language detection) are off by default
    # in StatsOptions; we say so explicitly because turning them on would sniff every
    # bytes value. Small histogram bucket counts keep the pixel histograms cheap.
    return tfdv.StatsOptions(
        schema=stats_hint_schema(),
        enable_semantic_domain_stats=False,
        num_histogram_buckets=10,
        num_quantiles_histogram_buckets=10,
        num_values_histogram_buckets=10,
        num_top_values=20,
    )


def decode_examples_batch(serialized: list[bytes]) -> pa.RecordBatch:
    """Serialized tf.Examples -> an Arrow batch where `pixels` is an int64 list per image."""
    batch = example_coder.ExamplesToRecordBatchDecoder().DecodeBatch(serialized)
    index = batch.schema.get_field_index(FEATURE_PIXELS)
    if index < 0:
        return batch  # the schema reports the missing feature; nothing to decode
    columns = list(batch.columns)
    columns[index] = pixels_as_int_lists(columns[index])
    return pa.RecordBatch.from_arrays(columns, batch.schema.names)


def pixels_as_int_lists(column: pa.Array) -> pa.Array:
    """list<bytes> per row -> list<int64> per row, one value per byte; nulls stay null.

    A row with several bytes values (not what ExampleGen writes) gets all of them
    concatenated, so its value count is wrong and the schema flags it.
    """
    rows = column.to_pylist()
    lengths = np.zeros(len(rows) + 1, dtype=np.int64)
    chunks: list[bytes] = []
    for i, values in enumerate(rows):
        joined = b"".join(values) if values else b""
        chunks.append(joined)
        lengths[i + 1] = len(joined)
    offsets = pa.array(np.cumsum(lengths), type=pa.int64())
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)
    mask = pa.array([values is None for values in rows])
    lists = pa.LargeListArray.from_arrays(offsets, pa.array(flat, type=pa.int64()))
    if mask.true_count:
        # from_arrays takes no mask in pyarrow 10; rebuild with nulls where the row had none.
        lists = pa.array([None if missing else lists[i].as_py()
                          for i, missing in enumerate(mask.to_pylist())],
                         type=pa.large_list(pa.int64()))
    return lists


def _remove_empty_beam_temp_dirs(output_dir: str) -> None:
    # WriteToTFRecord leaves an empty beam-temp-* directory next to each output file.
    for pattern in ("*/beam-temp-*", "*/*/beam-temp-*"):
        for temp_dir in fileio.glob(fileio.join(output_dir, pattern)):
            if fileio.isdir(temp_dir) and not fileio.listdir(temp_dir):
                fileio.rmtree(temp_dir)


def _load_named(path: str, name: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    fileio.register_filesystem(path)
    stats = tfdv.load_statistics(path)
    for dataset in stats.datasets:
        dataset.name = name
    return stats


# ----------------------------------------------------------------------------- verdict

def validation_verdict(stats: dict[str, statistics_pb2.DatasetFeatureStatisticsList],
                       schema_path: str, config: ValidationConfig) -> dict[str, Any]:
    """The verdict the validate step will give, from the same functions and schema.

    The validate step runs after this one and is what stops a run; the page shows its
    verdict up front so a person reads it before the charts.
    """
    if not fileio.exists(schema_path):
        return {"checked": False, "schema": schema_path,
                "summary": f"not checked: no schema at {schema_path}"}
    schema = checks.load_schema(schema_path, config.label_linf_threshold)
    baseline = stats.get(checks.BASELINE_SPLIT)
    anomalies, drift = {}, {}
    for split, split_stats in stats.items():
        previous = baseline if split != checks.BASELINE_SPLIT else None
        found = tfdv.validate_statistics(split_stats, schema, previous_statistics=previous)
        anomalies[split] = checks.describe_anomalies(found, split_stats)
        if previous is not None:
            drift[split] = checks.measure_label_drift(split, split_stats, previous, found,
                                                      config.label_linf_threshold)
    problems = any(anomalies.values()) or any(d.drifted for d in drift.values())
    blocking = problems and not config.allow_anomalies
    return {
        "checked": True, "schema": schema_path, "problems": problems, "blocking": blocking,
        "summary": checks.summarize(anomalies, drift, problems, blocking),
        "threshold": config.label_linf_threshold, "baseline": checks.BASELINE_SPLIT,
        "anomalies": anomalies,
        "drift": {split: {"linf": d.linf, "drifted": d.drifted} for split, d in drift.items()},
    }
