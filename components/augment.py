"""Augment: top every class of the training split up to the same count with altered copies.

The seed notebook balanced FER-2013 by rotating images (disgust, 547 images, was copied
~33 times). We keep that idea but do it only on the training split (copies of one face on
both sides of a split inflate test accuracy; see docs/architecture.md) and vary the copies more:
a horizontal flip, a small rotation and a small shift, combined.

One Beam pipeline over examples/train:

  read ─┬─────────────────────────────────────────────── originals, unchanged ─┐
        ├─ count per class ─ target ─┐                                          ├─ write train/
        └─ group by class ───────────┴─ plan copies ─ reshuffle ─ make copy ───┘
                                                                 summary ─> read back, deleted

Determinism: the copies depend only on config.seed and the originals, never on runner
parallelism or input order. Each class's originals are sorted by row_number, the k-th
extra copy is made from original (k mod n), and its transform parameters come from a
random generator seeded by (seed, source row, k).

Augmented examples keep the raw schema. Their `source_row` AND `row_number` are the
original's row_number: a copy has no CSV line of its own, and the checked-in schema
requires row_number >= 1, so 0 would be an anomaly. Copies are told apart from originals by
`augmentation`, which reads e.g. "copy:12,flip,rotate:+7.3,shift:(1,-2)" (copy index k,
then the operations in the order applied), enough to reproduce the copy exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import apache_beam as beam
import cv2
import numpy as np
import tensorflow as tf

from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import AugmentConfig
from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_FERPLUS, FEATURE_AUGMENTATION,
    FEATURE_FERPLUS_MAJORITY, FEATURE_LABEL, FEATURE_PIXELS, FEATURE_ROW, FEATURE_SOURCE_ROW,
    IMAGE_SIZE, EXAMPLES_PATTERN, SHARD_PREFIX, SHARD_SUFFIX)
from fer_pipeline.core.errors import MissingInputError

__all__ = ["run_augment", "AugmentResult"]

ORIGINAL = b"original"
SUMMARY_DIR = ".summary"  # per-class counts written by the pipeline, read back, removed


@dataclass
class AugmentResult:
    enabled: bool
    target_per_class: int                 # what each class was topped up to (0: disabled)
    counts_before: dict[str, int] = field(default_factory=dict)  # class name -> originals
    counts_after: dict[str, int] = field(default_factory=dict)   # originals + copies
    augmented: int = 0                    # copies written
    warnings: list[str] = field(default_factory=list)
    train_dir: str = ""


@dataclass(frozen=True)
class AugmentParams:
    """One copy's transform: flip, then rotate about the centre, then shift."""
    flip: bool
    angle: float   # degrees, counter-clockwise, rounded to 0.1 so the tag reproduces it
    dx: int        # pixels to the right
    dy: int        # pixels down

    def tag(self, copy_index: int) -> str:
        parts = [f"copy:{copy_index}"]
        if self.flip:
            parts.append("flip")
        if self.angle:
            parts.append(f"rotate:{self.angle:+.1f}")
        if self.dx or self.dy:
            parts.append(f"shift:({self.dx},{self.dy})")
        return ",".join(parts)


def draw_params(seed: int, source_row: int, copy_index: int,
                config: AugmentConfig) -> AugmentParams:
    """The copy's parameters, a pure function of (seed, source row, copy index)."""
    rng = np.random.default_rng([seed, source_row, copy_index])
    flip = bool(config.horizontal_flip and rng.random() < 0.5)
    angle = round(float(rng.uniform(-1.0, 1.0)) * config.max_rotation_degrees, 1)
    dx, dy = (int(v) for v in rng.integers(-config.max_shift_pixels,
                                           config.max_shift_pixels + 1, size=2))
    return AugmentParams(flip=flip, angle=angle + 0.0, dx=dx, dy=dy)  # + 0.0: no "-0.0"


def augment_image(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """uint8 [48, 48] -> uint8 [48, 48]. Pixels pulled in from outside the frame copy the
    nearest edge (border replicate), as a black border would be a feature no real face has."""
    if params.flip:
        image = image[:, ::-1]
    centre = ((IMAGE_SIZE - 1) / 2.0, (IMAGE_SIZE - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, params.angle, 1.0)
    matrix[:, 2] += (params.dx, params.dy)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (IMAGE_SIZE, IMAGE_SIZE),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def run_augment(examples_dir: str, output_dir: str, config: AugmentConfig,
                beam_args: list[str]) -> AugmentResult:
    """Writes output_dir/train/examples-*.tfrecord: the training originals plus copies."""
    pattern = fileio.join(examples_dir, "train", EXAMPLES_PATTERN)
    if not fileio.glob(pattern):
        raise MissingInputError(f"no training examples match {pattern}")
    train_dir = fileio.join(output_dir, "train")
    summary_dir = fileio.join(output_dir, SUMMARY_DIR)

    with beam_pipeline(beam_args, "augment") as pipeline:
        originals = (pipeline
                     | "Read" >> beam.io.ReadFromTFRecord(pattern)
                     | "Parse" >> beam.Map(_key_by_class))  # (label, (row_number, bytes))
        counts = originals | "CountPerClass" >> beam.combiners.Count.PerKey()
        target = (counts
                  | "ClassSizes" >> beam.Values()
                  | "Largest" >> beam.CombineGlobally(_largest)
                  | "Target" >> beam.Map(_choose_target, config))
        _ = (counts
             | "Summarize" >> beam.Map(_summary_line, beam.pvalue.AsSingleton(target))
             | "WriteSummary" >> beam.io.WriteToText(fileio.join(summary_dir, "counts")))

        outputs = [originals | "Originals" >> beam.Map(_serialized)]
        if config.enabled:
            copies = (originals
                      | "GroupByClass" >> beam.GroupByKey()
                      | "PlanCopies" >> beam.FlatMap(_plan_copies,
                                                     beam.pvalue.AsSingleton(target))
                      # One class can need thousands of copies: spread them over workers.
                      | "Spread" >> beam.Reshuffle()
                      | "MakeCopy" >> beam.Map(_make_copy, config))
            outputs.append(copies)
        _ = (outputs
             | "Merge" >> beam.Flatten()
             | "Write" >> beam.io.WriteToTFRecord(fileio.join(train_dir, SHARD_PREFIX),
                                                  file_name_suffix=SHARD_SUFFIX))

    return _result(config, _read_summary(summary_dir), train_dir)


# --- Pipeline functions (module level, so worker processes can unpickle them) -------------

def _key_by_class(serialized: bytes) -> tuple[int, tuple[int, bytes]]:
    """Keyed by the label training uses: FER+'s majority when ingest joined votes (every
    FER+ mode trains towards it), else FER-2013's label."""
    features = tf.train.Example.FromString(serialized).features.feature
    label = (features[FEATURE_FERPLUS_MAJORITY] if FEATURE_FERPLUS_MAJORITY in features
             else features[FEATURE_LABEL]).int64_list.value[0]
    row = features[FEATURE_ROW].int64_list.value[0]
    return label, (row, serialized)


def _serialized(keyed: tuple[int, tuple[int, bytes]]) -> bytes:
    return keyed[1][1]


def _largest(sizes: Iterable[int]) -> int:
    return max(sizes, default=0)


def _choose_target(largest: int, config: AugmentConfig) -> int:
    if not config.enabled:
        return 0
    return config.target_per_class or largest


def _summary_line(label_count: tuple[int, int], target: int) -> str:
    label, count = label_count
    return json.dumps({"label": label, "count": count, "copies": max(0, target - count),
                       "target": target})


def _plan_copies(label_rows: tuple[int, Iterable[tuple[int, bytes]]],
                 target: int) -> Iterator[tuple[bytes, int]]:
    """(original bytes, copy index k) for each copy this class needs to reach `target`.

    A class already at or above the target gets no copies (and is not cut down).
    """
    _, rows = label_rows
    ordered = sorted(rows)  # by row_number: the same plan whatever order the runner gave
    for k in range(max(0, target - len(ordered))):
        yield ordered[k % len(ordered)][1], k


def _make_copy(planned: tuple[bytes, int], config: AugmentConfig) -> bytes:
    original, copy_index = planned
    example = tf.train.Example.FromString(original)
    features = example.features.feature
    source_row = features[FEATURE_ROW].int64_list.value[0]
    params = draw_params(config.seed, source_row, copy_index, config)
    image = np.frombuffer(features[FEATURE_PIXELS].bytes_list.value[0], np.uint8)
    copy = augment_image(image.reshape(IMAGE_SIZE, IMAGE_SIZE), params)

    features[FEATURE_PIXELS].bytes_list.value[0] = copy.tobytes()
    features[FEATURE_SOURCE_ROW].int64_list.value[:] = [source_row]
    features[FEATURE_AUGMENTATION].bytes_list.value[:] = [params.tag(copy_index).encode()]
    # row_number stays the original's (see the module docstring); usage stays "Training".
    return example.SerializeToString(deterministic=True)


# --- After the pipeline -----------------------------------------------------------------

def _read_summary(summary_dir: str) -> list[dict]:
    lines = []
    for path in fileio.glob(fileio.join(summary_dir, "counts*")):
        lines.extend(json.loads(line) for line in fileio.read_text(path).splitlines()
                     if line.strip())
    fileio.rmtree(summary_dir)
    return lines


def _result(config: AugmentConfig, summary: list[dict], train_dir: str) -> AugmentResult:
    by_label = {row["label"]: row for row in summary}
    target = summary[0]["target"] if summary else 0
    before, after, warnings = {}, {}, []
    # FER+'s contempt (label 7) appears only when its eighth class is kept.
    names = CLASS_NAMES_FERPLUS if max(by_label, default=0) >= len(CLASS_NAMES) else CLASS_NAMES
    for label, name in enumerate(names):
        row: Optional[dict] = by_label.get(label)
        count = row["count"] if row else 0
        copies = row["copies"] if (row and config.enabled) else 0
        before[name], after[name] = count, count + copies
        if count == 0 and config.enabled and target > 0:
            warnings.append(f"class {label} ({name}) has no training examples; "
                            f"it cannot be topped up to {target}")
    unknown = sorted(set(by_label) - set(range(len(names))))
    if unknown:
        warnings.append(f"labels outside 0..{len(names) - 1} were topped up too: {unknown}")
    return AugmentResult(enabled=config.enabled, target_per_class=target,
                         counts_before=before, counts_after=after,
                         augmented=sum(row["copies"] for row in summary) if config.enabled else 0,
                         warnings=warnings, train_dir=train_dir)
