"""Reading the request logs: every logged Predict of a window as faces and answers.

The logs are TF Serving `PredictionLog` TFRecords (serving/request_log.py writes them). A
record becomes one row per face it carried, with the model, version, probabilities and
time that answered it; anything else is counted, never guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import tensorflow as tf

from fer_pipeline.core.contract import (FEATURE_PIXELS, IMAGE_SIZE, INPUT_EXAMPLES, INPUT_PIXELS,
    NUM_CLASSES, NUM_PIXELS, OUTPUT_PROBABILITIES, SIGNATURE_EXPLAIN)
from fer_pipeline.serving.request_log import log_files, read_logs

__all__ = ["Traffic", "read_traffic", "epoch_seconds", "iso_time"]


@dataclass
class Traffic:
    """Every face answered in the window, one row per (logged request, face)."""
    pixels: np.ndarray                 # uint8 [n, 48, 48]
    models: np.ndarray                 # str [n]
    versions: np.ndarray               # int64 [n]
    probabilities: np.ndarray          # float32 [n, 7]
    timestamps: np.ndarray             # int64 [n], seconds since the epoch (0: unknown)
    records: int                       # PredictionLogs in the window
    skipped: dict[str, int]            # why records were not used -> how many
    files: list[str]


def epoch_seconds(moment: Optional[datetime]) -> Optional[float]:
    """Seconds since the epoch of `moment` (a naive time is taken as UTC); None stays None."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def iso_time(seconds: Optional[float]) -> Optional[str]:
    """`seconds` since the epoch as an ISO 8601 UTC time to the second; None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _faces_from_request(inputs: Mapping[str, Any]) -> np.ndarray:
    """The faces of one PredictRequest, uint8 [n, 48, 48], whichever signature it used."""
    if INPUT_PIXELS in inputs:
        values = tf.make_ndarray(inputs[INPUT_PIXELS])
        if values.size % NUM_PIXELS or values.min(initial=0) < 0 or \
                values.max(initial=0) > 255:
            raise ValueError("pixels are not 48x48 values in 0..255")
        return values.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    if INPUT_EXAMPLES in inputs:
        serialized = tf.make_ndarray(inputs[INPUT_EXAMPLES]).reshape(-1)
        faces = []
        for raw in serialized:
            example = tf.train.Example.FromString(raw)
            [pixels] = example.features.feature[FEATURE_PIXELS].bytes_list.value
            faces.append(np.frombuffer(pixels, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
        return np.stack(faces) if faces else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    raise ValueError(f"no {INPUT_PIXELS!r} or {INPUT_EXAMPLES!r} input")


def read_traffic(paths: Iterable[str], since: Optional[datetime] = None,
                 until: Optional[datetime] = None) -> Traffic:
    """The faces and answers of every logged Predict in [since, until).

    Records that are not a Predict (Classify), `explain` calls (a second look at faces
    already answered) and records that do not parse as faces and probabilities are counted
    in `skipped`, never guessed at.
    """
    files = log_files(list(paths))
    start, end = epoch_seconds(since), epoch_seconds(until)
    pixels, models, versions, probabilities, timestamps = [], [], [], [], []
    skipped: dict[str, int] = {}
    records = 0
    for record in read_logs(files):
        stamp = record.log_metadata.timestamp_secs
        if (start is not None and stamp < start) or (end is not None and stamp >= end):
            continue
        records += 1
        if record.WhichOneof("log_type") != "predict_log":
            skipped["not a Predict"] = skipped.get("not a Predict", 0) + 1
            continue
        spec = record.log_metadata.model_spec
        request, response = record.predict_log.request, record.predict_log.response
        if (spec.signature_name or request.model_spec.signature_name) == SIGNATURE_EXPLAIN:
            skipped["explain"] = skipped.get("explain", 0) + 1
            continue
        try:
            faces = _faces_from_request(request.inputs)
            probs = tf.make_ndarray(response.outputs[OUTPUT_PROBABILITIES]).reshape(
                -1, NUM_CLASSES).astype(np.float32)
            if len(probs) != len(faces):
                raise ValueError("faces and answers differ in number")
        except (ValueError, KeyError, TypeError) as error:
            reason = f"malformed ({error})"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        version = spec.version.value or response.model_spec.version.value
        pixels.append(faces)
        probabilities.append(probs)
        models += [spec.name or response.model_spec.name] * len(faces)
        versions.append(np.full(len(faces), version, np.int64))
        timestamps.append(np.full(len(faces), stamp, np.int64))
    if not pixels:
        return Traffic(np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.array([], str),
                       np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), np.float32),
                       np.zeros(0, np.int64), records, skipped, files)
    return Traffic(np.concatenate(pixels), np.array(models), np.concatenate(versions),
                   np.concatenate(probabilities), np.concatenate(timestamps), records,
                   skipped, files)
