"""The monitor's Beam job: request logs in, statistics and a bounded sample out.

    logs --ReadAllFromTFRecord--> records --decode--> answers (one per model and face)
         --WritePartitions / GroupByKey(file names) / join_partition--> faces (join.py)
    faces --> tfdv.GenerateStatistics, sliced by time window (image features, answers)
          --> hash sample --> tfdv.GenerateStatistics (every pixel value)
    counts --> CombinePerKey(sum): records, bad / skipped reasons (summed as decoded),
              class mix, confidence, review rate per window and model version (summed
              per partition by the join)
          --> Top.SmallestPerKey over groups by key hash: the least confident faces,
              the tied faces (bounded; the driver sorts the union and keeps the bound)

Everything runs in the workers; the driver gets only the statistics, the sums and the two
bounded samples, written by the job as a few small TFRecord shards (`collect` reads them),
so its memory does not grow with the window. The job runs wherever the Beam flags say
(core/beam_job.py): the DirectRunner in-process or multi-processing, Flink, Spark.

The logs are read with Beam's TFRecord source over the file names the driver listed
(those are the files the run records as its inputs in ML Metadata). A file a server still
writes (`.partial`) may end in half a record: it is read up to its last whole record.

Which version of a model is judged is only known once the window is counted, so the
answers' features are per model version (`class_cnn@2`), and the review flag per set of
versions that answered together (`review@cnn=2,vgg16=1`); the driver picks the ones of the
served versions. Sums are integers (confidence in units of 1e-9), so every runner adds up
to the same numbers.
"""
from __future__ import annotations

import functools
import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow_data_validation as tfdv
from tensorflow_data_validation.utils import slicing_util
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.components.monitor.features import (CATEGORICAL_FEATURES, CLIPPED,
    MAX_PIXEL_FACES, NOT_CLIPPED, NUMBERS)
from fer_pipeline.components.monitor.join import (Face, WritePartitions, join_partition,
    partition_count)
from fer_pipeline.components.monitor.reading import decode_record
from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import FEATURE_PIXELS, NUM_PIXELS, class_names_for

__all__ = ["WINDOW_FEATURE", "ALL", "CONFIDENCE_UNIT", "MAX_TIES", "Collected", "collect",
           "answer_feature", "review_feature", "combination", "window_slice"]

WINDOW_FEATURE = "window"
ALL = ""                        # the whole window's label in the sums
CONFIDENCE_UNIT = 1e-9          # confidences are summed as integers of this unit
MAX_TIES = 2000                 # tied faces brought back for the review queue, at most
BYTES_PER_FACE = 2400           # a batch-1 uint8 record's size: the pixel sample's rate
_BATCH = 512
_RESULTS = "results"                 # results-<shard>-of-<n>.tfrecord in the scratch


def answer_feature(kind: str, model: str, version: int) -> str:
    """`class_cnn@2` / `confidence_cnn@2`: one model version's answers."""
    return f"{kind}_{model}@{version}"


def combination(versions: Iterable[tuple[str, int]]) -> str:
    """`cnn=2,vgg16=1`: the model versions that answered one face together."""
    return ",".join(f"{m}={v}" for m, v in sorted(versions))


def review_feature(combo: str) -> str:
    return f"review@{combo}"


def window_slice(label: str) -> str:
    """The name TFDV gives the slice of window `label`."""
    return f"{WINDOW_FEATURE}_{label}"


def _window(stamp: int, width: int) -> Optional[str]:
    return str(stamp // width * width) if stamp > 0 and width > 0 else None


@dataclass
class Collected:
    """What the job brings back to the driver."""
    files: list[str]
    stats: statistics_pb2.DatasetFeatureStatisticsList      # whole window + its slices
    pixel_stats: statistics_pb2.DatasetFeatureStatisticsList
    counts: dict[tuple, int]
    stamps: tuple[Optional[int], Optional[int]]            # first, last known time
    lowest: list[Face]                                     # least confident first
    ties: list[Face]
    window_width: int = 0
    partitions: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return self.counts.get(("records",), 0)

    def reasons(self, kind: str) -> dict[str, int]:
        return {k[1]: n for k, n in sorted(self.counts.items()) if k[0] == kind}

    def served(self) -> dict[tuple[str, int], int]:
        """(model, version) -> faces it answered in the whole window."""
        return {(k[2], k[3]): n for k, n in self.counts.items()
                if k[0] == "answers" and k[1] == ALL}

    def windows(self) -> list[str]:
        return sorted({k[1] for k in self.counts if k[0] == "faces" and k[1] != ALL},
                      key=int)


class _Decode(beam.DoFn):
    def __init__(self, start: Optional[float], end: Optional[float],
                 config: MonitorConfig) -> None:
        self._start, self._end, self._config = start, end, config

    def process(self, raw: bytes) -> Iterator[Any]:
        for item in decode_record(raw, self._start, self._end, self._config):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple):
                yield beam.pvalue.TaggedOutput("counts", item)
            else:
                yield item


def _read_open_file(path: str) -> Iterator[bytes]:
    """The whole records of a file a server may still be appending to."""
    import tensorflow as tf
    records = iter(tf.data.TFRecordDataset(path))
    while True:
        try:
            yield next(records).numpy()
        except (StopIteration, tf.errors.DataLossError):
            return


def _face_counts(face: Face, width: int) -> Iterator[tuple[tuple, int]]:
    """The sums one face adds to: its window's and the whole window's."""
    labels = [ALL] + [w for w in [_window(face.stamp, width)] if w is not None]
    combo = combination((m, v) for m, v, _ in face.answers)
    for label in labels:
        yield ("faces", label), 1
        for model, version, raw in face.answers:
            probs = np.frombuffer(raw, np.float32)
            yield ("answers", label, model, version), 1
            yield ("class", label, model, version, int(probs.argmax())), 1
            yield ("width", label, model, version), probs.size    # 7 classes, FER+'s 8
            yield ("confidence", label, model, version), int(round(
                float(probs.max()) / CONFIDENCE_UNIT))
        if face.review is not None:
            yield ("paired", label, combo), 1
            yield ("ties", label, combo), int(face.review)


def _column(values: list) -> pa.Array:
    return pa.array([None if v is None else [v] for v in values])


def _faces_to_arrow(faces: list[Face], config: MonitorConfig, width: int) -> pa.RecordBatch:
    """One row per face: image features, window, each model version's answer, review."""
    columns: dict[str, list] = {}
    n = len(faces)
    for position, name in enumerate(NUMBERS):
        values = [f.numbers[position] for f in faces]
        if name in CATEGORICAL_FEATURES:
            values = [CLIPPED if v > config.clipped_share else NOT_CLIPPED for v in values]
        columns[name] = values
    columns[WINDOW_FEATURE] = [(_window(f.stamp, width) or None) for f in faces]
    for row, face in enumerate(faces):
        for model, version, raw in face.answers:
            probs = np.frombuffer(raw, np.float32)
            names = class_names_for(probs.size)     # 7 classes, or FER+'s 8
            for kind, value in (("class", names[int(probs.argmax())].encode()),
                                ("confidence", float(probs.max()))):
                columns.setdefault(answer_feature(kind, model, version), [None] * n)[row] = value
        if face.review is not None:
            name = review_feature(combination((m, v) for m, v, _ in face.answers))
            columns.setdefault(name, [None] * n)[row] = b"review" if face.review else b"decided"
    names = sorted(columns)
    return pa.RecordBatch.from_arrays([_column(columns[k]) for k in names], names)


def _pixels_to_arrow(faces: list[Face]) -> pa.RecordBatch:
    flat = np.frombuffer(b"".join(f.pixels for f in faces), np.uint8).astype(np.int64)
    offsets = pa.array(np.arange(0, len(flat) + 1, NUM_PIXELS, dtype=np.int32))
    return pa.RecordBatch.from_arrays([pa.ListArray.from_arrays(offsets, pa.array(flat))],
                                      [FEATURE_PIXELS])


def _sampled(face: Face, rate: float) -> bool:
    return zlib.crc32(face.key) < rate * 2 ** 32


def _sample_key(face: Face) -> tuple:
    return face.confidence, face.key


class _StampRange(beam.CombineFn):
    def create_accumulator(self):
        return None, None

    def add_input(self, acc, stamp):
        return self.merge_accumulators([acc, (stamp, stamp)])

    def merge_accumulators(self, accs):
        firsts = [a[0] for a in accs if a[0] is not None]
        lasts = [a[1] for a in accs if a[1] is not None]
        return (min(firsts) if firsts else None, max(lasts) if lasts else None)

    def extract_output(self, acc):
        return acc


def _tagged(name: str):
    def tag(value: Any) -> bytes:
        if isinstance(value, statistics_pb2.DatasetFeatureStatisticsList):
            value = value.SerializeToString()
        return pickle.dumps((name, value), protocol=pickle.HIGHEST_PROTOCOL)
    return tag


_FACES_PER_GROUP = 100           # a group's share of a bounded sample (see _smallest)


def _group(face: Face, groups: int) -> tuple[int, Face]:
    return zlib.crc32(face.key) % groups, face


def _smallest(faces, count: int, label: str):
    """About the `count` faces of least confidence, one element each (the driver sorts
    them and keeps `count`). One Top combiner's accumulator, a list that engines shuffle
    as one record, would carry every chosen face's pixels (2,000 tied faces: ~5 MB, more
    than a Flink sort buffer takes: "Record too large"); so the faces are spread over
    groups by the hash of their key, each group keeps twice its share (~500 KB), and the
    union holds the `count` smallest unless one group drew more than twice its share of
    them. (Ranking keys first and picking the faces by a side input made every runner
    hold all the faces until the ranking was done: 5 GiB at 1,000,000 requests.)"""
    groups = -(-count // _FACES_PER_GROUP)
    keep = count if groups == 1 else 2 * -(-count // groups)
    return (faces | f"{label}Groups" >> beam.Map(_group, groups)
            | f"{label}Top" >> beam.combiners.Top.SmallestPerKey(keep, key=_sample_key)
            | f"{label}Faces" >> beam.FlatMap(lambda group: group[1]))


def _batched(faces, label: str):
    return faces | f"Batch{label}" >> beam.BatchElements(min_batch_size=_BATCH,
                                                         max_batch_size=_BATCH)


def _build(pipeline: beam.Pipeline, files: Sequence[str], scratch: str, config: MonitorConfig,
           tolerance: float, start: Optional[float], end: Optional[float], width: int,
           partitions: int, pixel_rate: float, lowest: int) -> None:
    closed = [f for f in files if not f.endswith(".partial")]
    open_files = [f for f in files if f.endswith(".partial")]
    reads = {}
    if closed:
        reads["Closed"] = (pipeline | "LogFiles" >> beam.Create(closed)
                           | "ReadLogs" >> beam.io.ReadAllFromTFRecord())
    if open_files:
        reads["Open"] = (pipeline | "OpenLogFiles" >> beam.Create(open_files)
                         | "ReadOpenLogs" >> beam.FlatMap(_read_open_file))
    # Each read decoded and partitioned on its own: only the partition files' names and
    # the sums are flattened (a Flatten of records would be held by the DirectRunner).
    paths, record_sums = [], []
    for kind, records in reads.items():
        decoded = records | f"Decode{kind}" >> beam.ParDo(
            _Decode(start, end, config)).with_outputs("counts", main="answers")
        paths.append(decoded.answers | f"Partition{kind}" >> beam.ParDo(
            WritePartitions(scratch, partitions)))
        record_sums.append(decoded.counts | f"SumRecords{kind}" >> beam.CombinePerKey(sum)
                           | f"TagRecordCounts{kind}" >> beam.Map(_tagged("count")))
    joined = (paths | "PartitionFiles" >> beam.Flatten()
              | "FilesOfPartition" >> beam.GroupByKey()
              | "Join" >> beam.FlatMap(join_partition, tolerance, config,
                                       functools.partial(_face_counts, width=width)
                                       ).with_outputs("counts", main="faces"))
    faces = joined.faces
    # Summed where they are produced (a Flatten first would be a stage of its own, and
    # the DirectRunner would hold every count in between).
    face_sums = joined.counts | "SumFaces" >> beam.CombinePerKey(sum)
    options = tfdv.StatsOptions(experimental_slice_functions=[
        slicing_util.get_feature_value_slicer({WINDOW_FEATURE: None})])
    stats = (_batched(faces, "Faces")
             | "FacesToArrow" >> beam.Map(_faces_to_arrow, config, width)
             | "FaceStatistics" >> tfdv.GenerateStatistics(options))
    pixel_stats = (_batched(faces | "PixelSample" >> beam.Filter(_sampled, pixel_rate), "Pixels")
                   | "PixelsToArrow" >> beam.Map(_pixels_to_arrow)
                   | "PixelStatistics" >> tfdv.GenerateStatistics(tfdv.StatsOptions()))
    stamps = (faces | "Stamps" >> beam.Map(lambda f: f.stamp)
              | "Known" >> beam.Filter(lambda s: s > 0)
              | "StampRange" >> beam.CombineGlobally(_StampRange()))
    least = _smallest(faces, lowest, "Lowest")
    ties = _smallest(faces | "Tied" >> beam.Filter(lambda f: bool(f.review)), MAX_TIES, "Ties")
    results = [*record_sums, face_sums | "TagFaceCounts" >> beam.Map(_tagged("count")),
               stats | "TagStats" >> beam.Map(_tagged("stats")),
               pixel_stats | "TagPixels" >> beam.Map(_tagged("pixel_stats")),
               stamps | "TagStamps" >> beam.Map(_tagged("stamps")),
               least | "TagLowest" >> beam.Map(_tagged("lowest")),
               ties | "TagTies" >> beam.Map(_tagged("ties"))]
    (results | "Results" >> beam.Flatten()
     # Shards as the runner's bundles go: a fixed shard count would group the results by
     # shard, and engines sort each grouped record in a buffer of about 1 MiB on Flink,
     # less than a window's sliced statistics ("record exceeds the maximum size").
     | "WriteResults" >> beam.io.WriteToTFRecord(fileio.join(scratch, _RESULTS),
                                                 file_name_suffix=".tfrecord"))


def _read_results(scratch: str, bounds: dict[str, int]) -> dict[str, Any]:
    """The job's results; the sampled faces (`bounds`: sample -> at most how many) in
    order of confidence, then key."""
    import tensorflow as tf
    found: dict[str, Any] = {"count": {}, **{name: [] for name in bounds}}
    shards = tf.io.gfile.glob(fileio.join(scratch, f"{_RESULTS}-*-of-*.tfrecord"))
    for raw in tf.data.TFRecordDataset(sorted(shards)):
        name, value = pickle.loads(raw.numpy())
        if name == "count":
            found["count"][value[0]] = found["count"].get(value[0], 0) + value[1]
        elif name in ("stats", "pixel_stats"):
            found[name] = statistics_pb2.DatasetFeatureStatisticsList.FromString(value)
        elif name in bounds:
            found[name].append(value)
        else:
            found[name] = value
    for name, bound in bounds.items():
        # A key logged twice (a record written twice) is picked twice: the bound holds.
        found[name] = sorted(found[name], key=_sample_key)[:bound]
    return found


def _log_bytes(files: Sequence[str]) -> int:
    import tensorflow as tf
    return sum(tf.io.gfile.stat(f).length for f in files)


def collect(files: Sequence[str], scratch: str, config: MonitorConfig, tolerance: float,
            start: Optional[float], end: Optional[float], beam_args: Sequence[str] = (),
            lowest: int = 20) -> Collected:
    """Runs the job over the log `files` for [start, end) and reads its results; `scratch`
    is a directory the workers can write (the join's files, the results)."""
    size = _log_bytes(files)
    partitions = partition_count(size)
    # About MAX_PIXEL_FACES faces (fewer when records are bigger than a batch-1 uint8 one),
    # chosen by their key's hash: the same faces on every runner.
    pixel_rate = min(1.0, MAX_PIXEL_FACES * BYTES_PER_FACE / max(size, 1))
    width = int(config.window_minutes * 60)
    fileio.makedirs(scratch)
    with beam_pipeline(list(beam_args), "monitor") as pipeline:
        _build(pipeline, list(files), scratch, config, tolerance, start, end, width,
               partitions, pixel_rate, max(lowest, 1))
    found = _read_results(scratch, {"lowest": max(lowest, 1), "ties": MAX_TIES})
    empty = statistics_pb2.DatasetFeatureStatisticsList()
    return Collected(list(files), found.get("stats", empty), found.get("pixel_stats", empty),
                     found["count"], tuple(found.get("stamps", (None, None))),
                     list(found.get("lowest", [])), list(found.get("ties", [])), width,
                     partitions, {"pixel_rate": pixel_rate, "log_bytes": size})
