"""The bulk inferrer's records: a model version to run, a face as it travels through the
Beam pipeline (a plain dataclass, so it pickles), and the step's result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["BulkInferenceResult", "Face", "ModelVersion"]


@dataclass(frozen=True)
class ModelVersion:
    """One model version to run: its name, version number and SavedModel directory."""
    name: str
    version: int
    path: str


@dataclass
class Face:
    """One face to score, as it travels through the pipeline (a plain record: it pickles)."""
    key: str                       # unique: "path:line" or "path#face<i>"
    source: str                    # the CSV or image file
    row: Optional[int]             # CSV line number (the header is line 1)
    face: Optional[int]            # index of the face in its photo, largest first
    box: Optional[list[int]]       # x, y, width, height in the photo
    label: Optional[int]           # the CSV's emotion, when it has one
    usage: str
    pixels: bytes                  # 2304 raw uint8 values


@dataclass
class BulkInferenceResult:
    input_kind: str                        # "csv" or "images"
    inputs_read: int                       # CSV rows (non-blank lines) or image files
    faces_scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    needs_review: int
    decisions: dict[str, int]              # class name -> faces the ensemble gave it
    models: dict[str, dict[str, Any]]      # name -> {"version", "path"}
    tolerance: float
    output_dir: str
    predictions_path: str                  # the shards' pattern, predictions-*-of-*.csv
    rejected_path: str                     # rejected-*-of-*.csv
    prediction_logs: dict[str, str]        # model -> its PredictionLog TFRecord pattern
    review_queue: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    execution_dir: str = ""                # what output_dir/COMMIT.json names
