"""What the bulk inferrer writes, and how its outputs are found again.

The Beam job writes every record through Beam sinks, as shards, under a fresh execution
directory `<output>/x-<time>-<random>/` (core/artifacts.py):

- `predictions/predictions-SSSSS-of-NNNNN.csv`: one row per face, each shard with the
  header line (`prediction_columns`), rows in no particular order;
- `rejected/rejected-SSSSS-of-NNNNN.csv`: the columns of ingest's rejected rows;
- `prediction_logs/<model>/prediction_logs-SSSSS-of-NNNNN.tfrecord`: TF Serving
  PredictionLogs;
- `flagged/flagged-SSSSS-of-NNNNN.jsonl` (with a review queue): the faces that need a
  person, with their pixels, which the driver queues for `fer-review` (review.py);
- `inference.json`: the driver's summary (counts from Beam metrics), written after the job.

`<output>/COMMIT.json`, written last, names the execution directory: `read_committed`
trusts only it, so a job that fails or is killed leaves the previous outputs in force.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np

from fer_pipeline.components.bulk_inferrer.counts import (DECISION, FACES_SCORED, NEEDS_REVIEW,
                                                          REJECTED, REJECTED_BY, count)
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import Commit, read_commit
from fer_pipeline.core.contract import (CLASS_NAMES, INFERENCE_REJECTED_FILE,
                                        PREDICTION_LOGS_DIR, PREDICTIONS_FILE, class_names_for)
from fer_pipeline.core.errors import MissingInputError
from fer_pipeline.core.fer_csv import JSONL_HEADER, reason_code

__all__ = ["FLAGGED_DIR", "OUTPUT_DIRS", "PREDICTION_COLUMNS_HEAD", "PREDICTION_COLUMNS_TAIL",
           "REJECTED_COLUMNS", "csv_rows", "jsonl_records", "prediction_columns",
           "prediction_line", "prediction_order", "read_committed", "rejected_line",
           "shard_pattern", "write_records"]

PREDICTION_COLUMNS_HEAD = ("source", "row", "face", "box", "label", "usage")
PREDICTION_COLUMNS_TAIL = ("decision", "confidence", "winner", "needs_review", "reason")
REJECTED_COLUMNS = ("line_number", "reason", "raw_line", "source")   # ingest's rejected rows
FLAGGED_DIR = "flagged"
_PREDICTIONS, _CSV = os.path.splitext(PREDICTIONS_FILE)    # predictions, .csv
_REJECTED = os.path.splitext(INFERENCE_REJECTED_FILE)[0]    # rejected
# Output name -> its directory in the execution directory (each a committed output).
OUTPUT_DIRS = {"predictions": _PREDICTIONS, "rejected": _REJECTED,
               "prediction_logs": PREDICTION_LOGS_DIR}
_SHARDS = "-SSSSS-of-NNNNN"


def prediction_columns(models: Sequence[str]) -> list[str]:
    per_model = [f"{m}_{c}" for m in models for c in ("class", "confidence", "version")]
    return [*PREDICTION_COLUMNS_HEAD, *per_model, *PREDICTION_COLUMNS_TAIL]


def prediction_order(row: dict[str, str]) -> tuple:
    """A predictions.csv row's place in (source, row, face) order, for readers who sort."""
    return (row["source"], int(row["row"] or 0), int(row["face"] or 0))


def _csv_line(cells: Sequence[Any]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()


def prediction_line(record: dict[str, Any], models: Sequence[str]) -> str:
    """One face's prediction record -> its CSV row (counted as it goes to the sink)."""
    decision = record["decision"]
    cells = [record["source"], _blank(record["row"]), _blank(record["face"]),
             " ".join(map(str, record["box"])) if record["box"] else "",
             "" if record["label"] is None else CLASS_NAMES[record["label"]],
             record["usage"]]
    for model in models:
        answer = record["models"][model]
        probabilities = answer["probabilities"]
        best = int(np.argmax(probabilities))
        cells += [class_names_for(len(probabilities))[best],     # 7 classes, or FER+'s 8
                  f"{probabilities[best]:.6f}", answer["version"]]
    cells += [decision["class_name"], f"{decision['confidence']:.6f}",
              decision["winner"], "yes" if decision["needs_human_review"] else "no",
              decision["reason"]]
    count(FACES_SCORED)
    count(DECISION + decision["class_name"])
    if decision["needs_human_review"]:
        count(NEEDS_REVIEW)
    return _csv_line(cells)


def rejected_line(record: dict[str, Any]) -> str:
    """One rejected row or file -> its CSV row (counted, and by reason code)."""
    count(REJECTED)
    count(REJECTED_BY + reason_code(record["reason"]))
    return _csv_line([record["line_number"], record["reason"], record["raw_line"],
                      record.get("source", "")])


def _blank(value: Optional[int]) -> Any:
    return "" if value is None else value


def shard_pattern(execution_dir: str, output: str) -> str:
    """The glob of an output's shards: predictions/predictions-*-of-*.csv, ..."""
    if output == "prediction_logs":
        return fileio.join(execution_dir, PREDICTION_LOGS_DIR, "*",
                           "prediction_logs-*-of-*.tfrecord")
    suffix = ".jsonl" if output == FLAGGED_DIR else _CSV
    name = OUTPUT_DIRS.get(output, output)
    return fileio.join(execution_dir, name, f"{name}-*-of-*{suffix}")


def write_records(predictions: Any, rejected: Any, flagged: Optional[Any],
                  execution_dir: str, models: Sequence[str]) -> None:
    """The sinks: predictions and rejected rows as CSV shards (each with its header, so
    no shard is empty: Beam's S3 filesystem cannot write an empty object), the flagged
    faces as JSON lines."""
    (predictions
     | "PredictionRows" >> beam.Map(prediction_line, list(models))
     | "WritePredictions" >> beam.io.WriteToText(
         fileio.join(execution_dir, _PREDICTIONS, _PREDICTIONS), _CSV,
         shard_name_template=_SHARDS, header=",".join(prediction_columns(models))))
    (rejected
     | "RejectedRows" >> beam.Map(rejected_line)
     | "WriteRejected" >> beam.io.WriteToText(
         fileio.join(execution_dir, _REJECTED, _REJECTED), _CSV,
         shard_name_template=_SHARDS, header=",".join(REJECTED_COLUMNS)))
    if flagged is not None:
        (flagged
         | "FlaggedJson" >> beam.Map(json.dumps)
         | "WriteFlagged" >> beam.io.WriteToText(
             fileio.join(execution_dir, FLAGGED_DIR, FLAGGED_DIR), ".jsonl",
             shard_name_template=_SHARDS, header=JSONL_HEADER))


# ---------------------------------------------------------------------------------------
# Reading the outputs back (one record at a time)

def read_committed(output_dir: str) -> Commit:
    """The committed bulk-inference outputs in `output_dir` (what COMMIT.json names)."""
    found = read_commit(output_dir)
    if found is None:
        raise MissingInputError(f"{output_dir}: no committed bulk-inference output "
                                "(no COMMIT.json); run fer-pipeline infer into it")
    return found


def csv_rows(pattern: str) -> Iterator[dict[str, str]]:
    """The rows of every CSV shard matching `pattern`, shard by shard (each has a header)."""
    for path in fileio.glob(pattern):
        with fileio.open_file(path) as handle:
            yield from csv.DictReader(handle)


def jsonl_records(pattern: str) -> Iterator[dict[str, Any]]:
    """The records of every JSON-lines shard matching `pattern`, one at a time."""
    for path in fileio.glob(pattern):
        with fileio.open_file(path) as handle:
            for line in handle:
                line = line.strip()
                if line and line != JSONL_HEADER:
                    yield json.loads(line)
