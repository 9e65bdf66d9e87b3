"""StatisticsGen: TFDV statistics for every split ExampleGen wrote, in one Beam pipeline.

Reads `<examples_dir>/<split>/examples-*.tfrecord`, writes `<output_dir>/<split>/stats.tfrecord`
(a `DatasetFeatureStatisticsList`, readable with `tfdv.load_statistics`) and
`<output_dir>/statistics.html`, a page comparing the splits.

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
three splits, writing and the HTML page: 6-7 % of the data half's 5-minute budget. That is cheap enough that we did not fall
back to derived per-example features (pixel_min/pixel_max/pixel_count), which would check
the same count and range but lose the pixel histogram and quantiles on the HTML page.
The only generators we keep off are the semantic-domain ones (image / natural-language
detection, off by default), which would sniff every bytes value and tell us nothing the
schema does not already say.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow_data_validation as tfdv
from apache_beam.options.pipeline_options import PipelineOptions
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2
from tfx_bsl.coders import example_coder

from pipeline.contract import (EXAMPLES_PATTERN, FEATURE_LABEL, FEATURE_PIXELS, NUM_CLASSES,
    SPLITS, STATISTICS_FILE, STATISTICS_HTML)

log = logging.getLogger(__name__)

# TFDV's statistics generators vectorize over Arrow record batches; ~1,000 examples of
# 2,304 int64 pixels is ~18 MB per batch, big enough to amortize per-batch overhead.
MIN_BATCH_SIZE = 64
MAX_BATCH_SIZE = 1000


@dataclass
class StatisticsResult:
    splits: list[str]
    num_examples: dict[str, int]
    stats_paths: dict[str, str]
    html_path: str
    duration_s: float = 0.0
    features: list[str] = field(default_factory=list)


def run_statistics(examples_dir: str, output_dir: str, beam_args: list[str]) -> StatisticsResult:
    """Computes TFDV statistics for each split present under `examples_dir`."""
    started = time.time()
    splits = present_splits(examples_dir)
    if not splits:
        raise FileNotFoundError(
            f"no split with {EXAMPLES_PATTERN} files under {examples_dir}; expected "
            f"subdirectories among {list(SPLITS)}")
    stats_paths = {split: os.path.join(output_dir, split, STATISTICS_FILE) for split in splits}
    for path in stats_paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)

    options = _stats_options()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
        for split in splits:
            pattern = os.path.join(examples_dir, split, EXAMPLES_PATTERN)
            _ = (pipeline
                 | f"Read[{split}]" >> beam.io.ReadFromTFRecord(pattern)
                 | f"Batch[{split}]" >> beam.BatchElements(
                     min_batch_size=MIN_BATCH_SIZE, max_batch_size=MAX_BATCH_SIZE)
                 | f"DecodeView[{split}]" >> beam.Map(decode_examples_batch)
                 | f"Stats[{split}]" >> tfdv.GenerateStatistics(options)
                 | f"Write[{split}]" >> tfdv.WriteStatisticsToTFRecord(stats_paths[split]))

    _remove_empty_beam_temp_dirs(output_dir)
    stats = {split: _load_named(stats_paths[split], split) for split in splits}
    html_path = os.path.join(output_dir, STATISTICS_HTML)
    Path(html_path).write_text(statistics_page(stats))
    log.info("statistics for %s in %.1f s", ", ".join(splits), time.time() - started)
    return StatisticsResult(
        splits=splits,
        num_examples={s: int(stats[s].datasets[0].num_examples) for s in splits},
        stats_paths=stats_paths,
        html_path=html_path,
        duration_s=round(time.time() - started, 3),
        features=sorted({f.path.step[0] for s in stats.values()
                         for f in s.datasets[0].features}),
    )


def present_splits(examples_dir: str) -> list[str]:
    """Known splits first, in pipeline order, then any other split directory, sorted."""
    root = Path(examples_dir)
    found = {p.name for p in root.iterdir()
             if p.is_dir() and any(p.glob(EXAMPLES_PATTERN))} if root.is_dir() else set()
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
    for temp_dir in Path(output_dir).glob("*/beam-temp-*"):
        if temp_dir.is_dir() and not any(temp_dir.iterdir()):
            temp_dir.rmdir()


def _load_named(path: str, name: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    stats = tfdv.load_statistics(path)
    for dataset in stats.datasets:
        dataset.name = name
    return stats


def statistics_page(stats: dict[str, statistics_pb2.DatasetFeatureStatisticsList]) -> str:
    """One HTML page: a plain per-split summary table, then TFDV's Facets view of all splits.

    The Facets view loads its JavaScript from a CDN, so the plain table is what a person
    sees offline.
    """
    splits = list(stats)
    return "\n".join([
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<title>FER-2013 statistics</title>",
        "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:right}"
        " th{background:#eee} td:first-child{text-align:left}</style></head><body>",
        f"<h1>FER-2013 data statistics: {', '.join(splits)}</h1>",
        *(_summary_table(split, stats[split].datasets[0]) for split in splits),
        "<h2>Facets overview</h2>",
        _facets_html(stats),
        "</body></html>",
    ])


def _summary_table(split: str, dataset: statistics_pb2.DatasetFeatureStatistics) -> str:
    header = ("<tr><th>feature</th><th>type</th><th>examples with it</th><th>missing</th>"
              "<th>values per example (min..max)</th><th>min</th><th>max</th>"
              "<th>mean</th><th>unique</th></tr>")
    rows = [_summary_row(feature) for feature in dataset.features]
    return (f"<h2>{html.escape(split)}: {dataset.num_examples} examples</h2>"
            f"<table>{header}{''.join(rows)}</table>")


def _summary_row(feature: statistics_pb2.FeatureNameStatistics) -> str:
    name = ".".join(feature.path.step) or feature.name
    kind = statistics_pb2.FeatureNameStatistics.Type.Name(feature.type)
    which = feature.WhichOneof("stats")
    common = getattr(feature, which).common_stats if which else None
    minimum = maximum = mean = unique = ""
    if which == "num_stats":
        minimum, maximum = f"{feature.num_stats.min:g}", f"{feature.num_stats.max:g}"
        mean = f"{feature.num_stats.mean:.4g}"
    elif which == "string_stats":
        unique = str(feature.string_stats.unique)
    cells = [name, kind,
             str(common.num_non_missing) if common else "",
             str(common.num_missing) if common else "",
             f"{common.min_num_values}..{common.max_num_values}" if common else "",
             minimum, maximum, mean, unique]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def _facets_html(stats: dict[str, statistics_pb2.DatasetFeatureStatisticsList]) -> str:
    """TFDV's Facets HTML, showing every split side by side.

    `get_statistics_html` compares at most two datasets (lhs/rhs); Facets itself takes
    any number. So we render train vs the next split with TFDV and swap the embedded
    proto for one holding all splits.
    """
    splits = list(stats)
    lhs = stats[splits[0]]
    rhs = stats[splits[1]] if len(splits) > 1 else None
    page = tfdv.utils.display_util.get_statistics_html(
        lhs, rhs, lhs_name=splits[0], rhs_name=splits[1] if rhs else "")
    if len(splits) <= 2:
        return page
    everything = statistics_pb2.DatasetFeatureStatisticsList()
    for split in splits:
        everything.datasets.add().CopyFrom(stats[split].datasets[0])
    embedded = re.search(r'proto-input="([A-Za-z0-9+/=]+)"', page)
    if embedded is None:  # TFDV changed its template; fall back to the two-split page
        return page
    return page.replace(embedded.group(1), _b64(everything))


def _b64(stats: statistics_pb2.DatasetFeatureStatisticsList) -> str:
    return base64.b64encode(stats.SerializeToString()).decode("utf-8")

