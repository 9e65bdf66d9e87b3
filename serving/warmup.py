"""Canary and warm-up requests: TF Serving's `assets.extra/tf_serving_warmup_requests`.

A version's first request pays for tracing and allocating what its signature needs;
TF Serving avoids that by replaying the requests in
`<version>/assets.extra/tf_serving_warmup_requests` (a TFRecord of `PredictionLog` protos,
at most 1,000 records) after loading a version and before serving it. The infra validator
(components/infra_validator.py) builds its canary requests here, sends them to a sandboxed
server, and writes the same requests into the version it lets the pusher publish;
`fer-serve` replays them on load (serving/model_manager.py) as TF Serving does.

Canary requests are built from serialized raw `tf.Example`s (the test split's), one
request per signature of the export contract, each in the input form that signature takes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from fer_pipeline.core.contract import (FEATURE_PIXELS, IMAGE_SIZE, INPUT_EXAMPLES, INPUT_PIXELS,
                               NUM_CLASSES, OUTPUT_CLASS_ID, OUTPUT_CLASS_NAME,
                               OUTPUT_PROBABILITIES, OUTPUT_SALIENCY, SIGNATURE_DEFAULT,
                               SIGNATURE_EXAMPLES, SIGNATURE_EXPLAIN, SIGNATURE_UINT8)
from fer_pipeline.core.errors import InputDataError

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000            # TF Serving refuses a version with more

# Every signature the trained models export, in the order canaries are sent.
CONTRACT_SIGNATURES: tuple[str, ...] = (SIGNATURE_DEFAULT, SIGNATURE_UINT8, SIGNATURE_EXAMPLES,
                                        SIGNATURE_EXPLAIN)


@dataclass(frozen=True)
class OutputSpec:
    """An output the contract promises: its dtype and its shape after the batch axis."""
    dtype: tf.dtypes.DType
    inner_shape: tuple[int, ...]


_OUTPUTS = {OUTPUT_PROBABILITIES: OutputSpec(tf.float32, (NUM_CLASSES,)),
            OUTPUT_CLASS_ID: OutputSpec(tf.int64, ()),
            OUTPUT_CLASS_NAME: OutputSpec(tf.string, ())}


def contract_outputs(signature: str, num_classes: int = NUM_CLASSES) -> dict[str, OutputSpec]:
    """The outputs (name -> spec) the export contract declares for `signature`, for a model
    of `num_classes` classes (FER-2013's 7; 8 for FER+ with contempt)."""
    outputs = {**_OUTPUTS, OUTPUT_PROBABILITIES: OutputSpec(tf.float32, (num_classes,))}
    if signature == SIGNATURE_EXPLAIN:
        return {**outputs, OUTPUT_SALIENCY: OutputSpec(tf.float32,
                                                       (num_classes, IMAGE_SIZE, IMAGE_SIZE))}
    return outputs


def pixels_of(serialized_examples: Sequence[bytes]) -> np.ndarray:
    """uint8 [n, 48, 48] faces from serialized raw tf.Examples (their `pixels` feature)."""
    parsed = tf.io.parse_example(list(serialized_examples),
                                 {FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string)})
    raw = parsed[FEATURE_PIXELS].numpy()
    return np.stack([np.frombuffer(r, np.uint8) for r in raw]).reshape(
        -1, IMAGE_SIZE, IMAGE_SIZE)


def canary_inputs(signature: str, serialized_examples: Sequence[bytes]) -> dict[str, np.ndarray]:
    """The inputs `signature` takes for these faces (the form a client would send)."""
    if signature == SIGNATURE_EXAMPLES:
        return {INPUT_EXAMPLES: np.array(list(serialized_examples), dtype=object)}
    pixels = pixels_of(serialized_examples)
    if signature == SIGNATURE_DEFAULT:
        return {INPUT_PIXELS: pixels.astype(np.int32)}
    if signature in (SIGNATURE_UINT8, SIGNATURE_EXPLAIN):
        return {INPUT_PIXELS: pixels}
    raise ValueError(f"no canary request is defined for signature {signature!r}; "
                     f"contract signatures: {list(CONTRACT_SIGNATURES)}")


def predict_request(model: str, signature: str,
                    inputs: Mapping[str, np.ndarray]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def canary_requests(model: str, serialized_examples: Sequence[bytes],
                    signatures: Sequence[str] = CONTRACT_SIGNATURES,
                    explain_examples: int = 1) -> list[predict_pb2.PredictRequest]:
    """One Predict request per signature; `explain` gets only the first `explain_examples`
    faces (integrated gradients cost 7 backward passes per integration step and face)."""
    requests = []
    for signature in signatures:
        faces = (serialized_examples[:explain_examples] if signature == SIGNATURE_EXPLAIN
                 else serialized_examples)
        requests.append(predict_request(model, signature, canary_inputs(signature, faces)))
    return requests


def request_inputs(request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    return {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}


# ----------------------------------------------------------------------------- the file

def warmup_path(version_dir: str) -> str:
    return os.path.join(version_dir, WARMUP_DIR, WARMUP_FILE)


def write_warmup_requests(version_dir: str,
                          requests: Sequence[predict_pb2.PredictRequest]) -> str:
    """Writes `requests` as TF Serving's warm-up file inside a local SavedModel directory."""
    if len(requests) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(requests)} warm-up requests; TF Serving reads at most "
                         f"{MAX_WARMUP_RECORDS}")
    path = warmup_path(version_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.CopyFrom(request)
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(version_dir: str) -> list[predict_pb2.PredictRequest]:
    """The Predict requests of a version's warm-up file ([] when it has none).

    Raises ValueError, as TF Serving fails the load, for more than 1,000 records or a
    record fer-serve cannot replay (only `predict_log` records are supported).
    """
    path = warmup_path(version_dir)
    if not os.path.exists(path):
        return []
    requests = []
    for number, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator(), 1):
        if number > MAX_WARMUP_RECORDS:
            raise InputDataError(f"{path} holds more than {MAX_WARMUP_RECORDS} warm-up records")
        log = prediction_log_pb2.PredictionLog.FromString(record)
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            raise InputDataError(f"warm-up record {number} of {path} is a {kind}; fer-serve "
                                 "replays predict_log records only")
        requests.append(log.predict_log.request)
    return requests


def replay_warmup(version_dir: str,
                  run: Callable[[str, dict[str, np.ndarray]], object]) -> int:
    """Sends every warm-up request of `version_dir` through `run(signature, inputs)`;
    returns how many ran. An error propagates: the version must not be served."""
    requests = read_warmup_requests(version_dir)
    for number, request in enumerate(requests, 1):
        try:
            run(request.model_spec.signature_name or SIGNATURE_DEFAULT, request_inputs(request))
        except Exception as error:
            raise InputDataError(f"warm-up request {number} of {len(requests)} "
                                 f"({request.model_spec.signature_name}) failed: "
                                 f"{getattr(error, 'message', None) or error}") from error
    return len(requests)
