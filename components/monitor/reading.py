"""Reading the request logs, one record at a time (this runs in the Beam workers).

The logs are TF Serving `PredictionLog` TFRecords (serving/request_log.py writes them).
`decode_record` turns one serialized record into one `Answer` per face it carried: the
request's key, the model, version, time and probabilities that answered it, and the face's
pixels (its image numbers are measured once per face, after the join: join.py). What it
cannot use is counted, by reason, never guessed at:

* `SKIPPED` reasons are records that are fine but not monitored: a Classify, a second look
  at faces already answered (`explain`);
* `BAD` reasons are records that cannot be decoded or break the SERVING schema (a face
  that is not 48x48 values in 0..255, answers that do not match the faces): the monitor
  alerts when their share crosses `monitor.max_bad_share`.

A face's key joins the models' answers to one request: the request id the server logged
(`log_metadata.request_origin`, serving/request_log.py says why there) and the face's
position in the request. A record logged without one (an older server) gets a key of its
own: its answers are counted per model, never paired with another model's.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Union

import numpy as np

from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import (CLASS_NAMES_FERPLUS, FEATURE_PIXELS, IMAGE_SIZE,
    INPUT_EXAMPLES, INPUT_PIXELS, NUM_CLASSES, NUM_PIXELS, OUTPUT_PROBABILITIES, SIGNATURE_EXPLAIN)

__all__ = ["Answer", "Count", "SKIPPED", "BAD", "decode_record", "epoch_seconds", "iso_time"]

SKIPPED = ("not a Predict", "explain")
FER_WIDTHS = (NUM_CLASSES, len(CLASS_NAMES_FERPLUS))     # FER-2013's classes, FER+'s
BAD_UNREADABLE = "not a PredictionLog"
BAD_NO_FACES = "no pixels or examples input"
BAD_SHAPE = "faces are not 48x48"
BAD_RANGE = "pixel values outside 0..255"
BAD_NO_ANSWERS = "no probabilities output"
BAD_MISMATCH = "faces and answers differ in number"
BAD = (BAD_UNREADABLE, BAD_NO_FACES, BAD_SHAPE, BAD_RANGE, BAD_NO_ANSWERS, BAD_MISMATCH)


class Answer(NamedTuple):
    """One model's answer for one face of one logged request."""
    key: bytes                 # request id and the face's position in the request
    model: str
    version: int
    stamp: int                 # seconds since the epoch (0: unknown)
    probabilities: bytes       # float32 [7]
    pixels: bytes              # uint8 [48 * 48]


# A counted event: ("records",), ("skipped", reason) or ("bad", reason), and how many.
Count = tuple[tuple, int]


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


class _Bad(Exception):
    """A record that breaks the serving schema; the argument is the reason counted."""


# TensorProto dtypes read straight from tensor_content (tf.make_ndarray costs ~20 us more a
# tensor, a good part of a batch-1 record's decoding).
_NUMPY_TYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 9: np.int64}


def _array(proto: Any) -> np.ndarray:
    dtype = _NUMPY_TYPES.get(proto.dtype)
    shape = [d.size for d in proto.tensor_shape.dim]
    if dtype is not None and proto.tensor_content and all(d >= 0 for d in shape):
        values = np.frombuffer(proto.tensor_content, dtype)
        if values.size == int(np.prod(shape)):
            return values.reshape(shape)
    import tensorflow as tf
    try:
        return tf.make_ndarray(proto)
    except Exception as error:   # a tensor that does not parse is the record's fault
        raise _Bad(BAD_UNREADABLE) from error


def _faces(inputs: Mapping[str, Any]) -> np.ndarray:
    """The faces of one PredictRequest, uint8 [n, 48, 48], whichever signature it used."""
    if INPUT_PIXELS in inputs:
        values = _array(inputs[INPUT_PIXELS])
        if values.dtype.kind not in "iuf" or values.size % NUM_PIXELS:
            raise _Bad(BAD_SHAPE)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise _Bad(BAD_RANGE)
        return values.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    if INPUT_EXAMPLES in inputs:
        import tensorflow as tf
        faces = []
        for raw in _array(inputs[INPUT_EXAMPLES]).reshape(-1):
            try:
                example = tf.train.Example.FromString(raw)
            except Exception as error:
                raise _Bad(BAD_UNREADABLE) from error
            values = example.features.feature[FEATURE_PIXELS].bytes_list.value
            if len(values) != 1 or len(values[0]) != NUM_PIXELS:
                raise _Bad(BAD_SHAPE)
            faces.append(np.frombuffer(values[0], np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
        return np.stack(faces) if faces else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    raise _Bad(BAD_NO_FACES)


def _probabilities(outputs: Mapping[str, Any], faces: int) -> np.ndarray:
    if OUTPUT_PROBABILITIES not in outputs:
        raise _Bad(BAD_NO_ANSWERS)
    probs = _array(outputs[OUTPUT_PROBABILITIES])
    # A FER+ model answers 8 classes (with contempt), FER-2013's 7: the tensor's own width.
    width = probs.shape[-1] if probs.ndim == 2 else NUM_CLASSES
    if width not in FER_WIDTHS or probs.size != faces * width:
        raise _Bad(BAD_MISMATCH)
    return probs.reshape(-1, width).astype(np.float32)


def _request_key(record: Any, raw: bytes) -> bytes:
    """The join key's request part: the logged request id, or the record's own digest."""
    request_id = record.log_metadata.request_origin
    if request_id:
        return b"id:" + request_id.encode()
    return b"record:" + hashlib.sha1(raw).digest()[:12]


def decode_record(raw: bytes, start: Optional[float], end: Optional[float],
                  config: MonitorConfig) -> Iterator[Union[Answer, Count]]:
    """The answers of one logged record in [start, end), or what it counts as.

    Yields `Answer`s, and `Count`s: ("records",) for every record in the window, then its
    reason when it is skipped or bad. A record that does not parse has no time: it is
    counted whatever the window.
    """
    from tensorflow_serving.apis import prediction_log_pb2
    try:
        record = prediction_log_pb2.PredictionLog.FromString(raw)
    except Exception:   # protobuf's DecodeError, or worse: the bytes are not a record
        yield ("records",), 1
        yield ("bad", BAD_UNREADABLE), 1
        return
    stamp = record.log_metadata.timestamp_secs
    if (start is not None and stamp < start) or (end is not None and stamp >= end):
        return
    yield ("records",), 1
    if record.WhichOneof("log_type") != "predict_log":
        yield ("skipped", "not a Predict"), 1
        return
    spec = record.log_metadata.model_spec
    request, response = record.predict_log.request, record.predict_log.response
    if (spec.signature_name or request.model_spec.signature_name) == SIGNATURE_EXPLAIN:
        yield ("skipped", "explain"), 1
        return
    try:
        faces = _faces(request.inputs)
        probs = _probabilities(response.outputs, len(faces))
    except _Bad as bad:
        yield ("bad", str(bad)), 1
        return
    model = spec.name or response.model_spec.name
    version = int(spec.version.value or response.model_spec.version.value)
    request_key = _request_key(record, raw)
    for index in range(len(faces)):
        yield Answer(request_key + b"#%d" % index, model, version, int(stamp),
                     probs[index].tobytes(), faces[index].tobytes())
