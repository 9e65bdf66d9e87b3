"""Joining the models' answers to one request, in bounded memory on every runner.

Each model logs its answers to its own files, so the answers for one face meet only after
a shuffle by the face's key (reading.py: the logged request id and the face's position).
A GroupByKey would do it, but the DirectRunner holds a whole shuffle in its own memory:
its resident size would grow with the window. So the join goes through files, as a grace
hash join does: `WritePartitions` appends each answer to the file of its key's partition
(one file per partition and bundle, under a scratch directory), only the file names are
shuffled, and `join_partition` reads one partition's files at a time and pairs what is in
them. Memory per worker is one partition's answers; the driver picks the number of
partitions from the logs' size (`partition_count`), so it stays flat in the window.

A bundle that fails leaves its files behind unnamed: only the names a finished bundle
emitted are read, so a retried bundle is never counted twice.
"""
from __future__ import annotations

import pickle
import struct
import uuid
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from fer_pipeline.components.monitor.features import measure
from fer_pipeline.components.monitor.reading import Answer
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import IMAGE_SIZE
from fer_pipeline.core.ensemble import combine_batch

__all__ = ["Face", "PARTITION_BYTES", "partition_count", "WritePartitions", "join_partition"]

# Log bytes per partition: a partition's answers (pixels included) are at most about this
# many bytes in a worker's memory, whatever the window's size.
PARTITION_BYTES = 64 * 1024 * 1024
MAX_PARTITIONS = 512           # open files per bundle; beyond, partitions grow instead
_LENGTH = struct.Struct("<I")
_MEASURE_BATCH = 1024          # faces whose image numbers are measured together


class Face(NamedTuple):
    """One face of one request, with every model's answer to it."""
    key: bytes
    stamp: int                 # the earliest of its answers' times (0: unknown)
    numbers: tuple             # image numbers, features.NUMBERS order
    pixels: bytes
    answers: tuple             # ((model, version, probabilities bytes), ...) by model
    confidence: float          # the least confident model's top probability
    review: Optional[bool]     # the ensemble's tie rule (None: one model answered)

    def probabilities(self, model: str) -> Optional[np.ndarray]:
        for name, _, probs in self.answers:
            if name == model:
                return np.frombuffer(probs, np.float32)
        return None


def partition_count(log_bytes: int) -> int:
    """How many partitions the join of `log_bytes` of logs uses."""
    return int(min(MAX_PARTITIONS, max(1, -(-log_bytes // PARTITION_BYTES))))


def _partition(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions   # the same on every worker (hash() is salted)


class WritePartitions(beam.DoFn):
    """Appends each Answer to its partition's file of this bundle; emits (partition, file
    name) for each file when the bundle ends."""

    def __init__(self, directory: str, partitions: int) -> None:
        self._directory = directory
        self._partitions = partitions
        self._files: dict[int, tuple[str, object]] = {}

    def start_bundle(self) -> None:
        self._files = {}

    def process(self, answer: Answer) -> Iterator[tuple[int, str]]:
        part = _partition(answer.key, self._partitions)
        if part not in self._files:
            path = FileSystems.join(self._directory, f"p{part:04d}-{uuid.uuid4().hex}.bin")
            self._files[part] = (path, FileSystems.create(path))
        data = pickle.dumps(tuple(answer), protocol=pickle.HIGHEST_PROTOCOL)
        self._files[part][1].write(_LENGTH.pack(len(data)) + data)
        return iter(())

    def finish_bundle(self) -> Iterator:
        for part, (path, handle) in sorted(self._files.items()):
            handle.close()
            yield GlobalWindows.windowed_value((part, path))
        self._files = {}


def _read_answers(path: str) -> Iterator[Answer]:
    with FileSystems.open(path) as handle:
        data = handle.read()
    offset = 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        yield Answer(*pickle.loads(data[offset:offset + length]))
        offset += length


def _face(key: bytes, answers: list[Answer], tolerance: float) -> tuple[Face, int]:
    """The face of `answers` (one key; its image numbers still to measure), and how many
    duplicate answers were dropped (a model answering one request id twice: its first
    answer, by time then content)."""
    by_model: dict[str, Answer] = {}
    for answer in sorted(answers, key=lambda a: (a.stamp, a.version, a.probabilities)):
        by_model.setdefault(answer.model, answer)
    chosen = [by_model[m] for m in sorted(by_model)]
    probs = {a.model: np.frombuffer(a.probabilities, np.float32).reshape(1, -1)
             for a in chosen}
    # A 7- and an 8-class model (FER-2013 and FER+) have no ensemble: no tie to count.
    same_classes = len({p.shape[1] for p in probs.values()}) == 1
    review = (bool(combine_batch(probs, tolerance)[2][0]) if len(chosen) > 1 and same_classes
              else None)
    stamps = [a.stamp for a in chosen if a.stamp > 0]
    first = chosen[0]
    face = Face(key, min(stamps) if stamps else 0, (), first.pixels,
                tuple((a.model, a.version, a.probabilities) for a in chosen),
                float(min(p.max() for p in probs.values())), review)
    return face, len(answers) - len(chosen)


def _measured(faces: list[Face], config: MonitorConfig) -> Iterator[Face]:
    """The faces with their image numbers, measured a batch at a time (vectorized)."""
    pixels = np.frombuffer(b"".join(f.pixels for f in faces), np.uint8).reshape(
        len(faces), IMAGE_SIZE, IMAGE_SIZE)
    numbers = measure(pixels, config)
    for row, face in enumerate(faces):
        yield face._replace(numbers=tuple(float(n[row]) for n in numbers))


def join_partition(partition: tuple[int, Iterable[str]], tolerance: float,
                   config: MonitorConfig,
                   face_counts: Callable[[Face], Iterator[tuple[tuple, int]]]
                   ) -> Iterator[object]:
    """The faces of one partition's files, and (tagged "counts") the sums of
    `face_counts` over them and the duplicate answers dropped, added up here: the runner
    then shuffles one sum per key and partition, not one element per face (the
    DirectRunner holds what crosses a stage in its own memory)."""
    _, paths = partition
    grouped: dict[bytes, list[Answer]] = {}
    for path in sorted(paths):
        for answer in _read_answers(path):
            grouped.setdefault(answer.key, []).append(answer)
    sums: dict[tuple, int] = {}
    duplicates = 0
    batch: list[Face] = []
    for key in sorted(grouped):
        face, dropped = _face(key, grouped.pop(key), tolerance)
        duplicates += dropped
        batch.append(face)
        if len(batch) == _MEASURE_BATCH or not grouped:
            for measured in _measured(batch, config):
                for name, value in face_counts(measured):
                    sums[name] = sums.get(name, 0) + value
                yield measured
            batch = []
    if duplicates:
        sums[("skipped", "duplicate answer")] = duplicates
    for name, value in sorted(sums.items(), key=repr):
        yield beam.pvalue.TaggedOutput("counts", (name, value))
