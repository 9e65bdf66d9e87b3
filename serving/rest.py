"""TF Serving's REST API (port 8501) over our ModelManager, as in TF Serving's api_rest.md.

    GET  /v1/models/{m}[/versions/{v}|/labels/{l}]            -> {"model_version_status": [...]}
    GET  /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata   -> {"model_spec", "metadata"}
    POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict
         {"signature_name"?, "instances": [...]}  -> {"predictions": [...]}   (row format)
         {"signature_name"?, "inputs": ...}       -> {"outputs": ...}         (columnar)

    GET  /monitoring/prometheus/metrics   -> server-side batching and request-log counters
         per model (TF Serving's metrics path; the metric names are this server's own)

Binary (string) values travel as {"b64": "..."}. JSON numbers are cast to the signature's
dtype (an int32 input rejects 1.5; a uint8 input rejects 300). Errors are {"error": "..."}
with 400 / 404 / 405 / 413; one bad request never stops the server. A bug answers 500
"internal error (id ...)": the id finds the traceback in the server's log, and nothing of
the exception reaches the caller. Connections, timeouts and overload (408, 503 with
Retry-After) are serving/http_server.py's.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from fer_pipeline.serving.http_server import (DISCONNECTS, BoundedHTTPServer, HttpLimits,
                                              PooledHandlerMixin)
from fer_pipeline.serving.model_manager import (DEFAULT_SIGNATURE, Predictor, ServingError)
from fer_pipeline.serving.request_log import REQUEST_ID_HEADER, request_id

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/v1/models/(?P<model>[^/:]+)"
                   r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?/?$")

# Not part of TF Serving's API: tells our client which version answered a predict (with the
# real TF Serving the client falls back to asking GET /v1/models/{m}).
VERSION_HEADER = "X-Model-Version"

_HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
                "RESOURCE_EXHAUSTED": 413, "UNAVAILABLE": 503, "INTERNAL": 500}


# --- JSON <-> numpy ---------------------------------------------------------------------

def _decode_b64(value: Any) -> Any:
    """Replaces every {"b64": "..."} with the bytes it encodes, recursively."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as error:
                raise ServingError("INVALID_ARGUMENT", f"bad b64 value: {error}")
        raise ServingError("INVALID_ARGUMENT", f"unexpected JSON object {sorted(value)} "
                                               "inside a tensor value")
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    return value


def to_array(name: str, value: Any, dtype: tf.DType) -> np.ndarray:
    """A JSON value as a numpy array of the signature's dtype, with TF Serving's checks."""
    if dtype != tf.string:
        # Numbers only (the usual case): numpy reads the nested lists in C. Walking them
        # for {"b64"} objects first cost ~0.6 ms a 48x48 face; only a value that is not
        # all numbers needs that walk (and its messages).
        try:
            raw = np.array(value)
        except ValueError:
            raw = None
        if raw is not None and raw.dtype.kind in "biuf":
            return _cast(name, raw, dtype)
    value = _decode_b64(value)
    if dtype == tf.string:
        try:
            array = np.array(value, dtype=object)
        except ValueError as error:
            raise ServingError("INVALID_ARGUMENT", f"input {name!r} is ragged: {error}")
        flat = [v.encode() if isinstance(v, str) else v for v in array.reshape(-1)]
        if not all(isinstance(v, bytes) for v in flat):
            raise ServingError("INVALID_ARGUMENT", f"input {name!r} expects strings")
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape)
    try:
        raw = np.array(value)
    except ValueError as error:
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} is ragged (rows of different "
                                               f"lengths): {error}")
    if raw.dtype.kind not in "biuf":
        raise ServingError("INVALID_ARGUMENT", f"input {name!r} must hold numbers for dtype "
                                               f"{dtype.name}; got {raw.dtype} values")
    return _cast(name, raw, dtype)


def _cast(name: str, raw: np.ndarray, dtype: tf.DType) -> np.ndarray:
    """Numbers as the signature's dtype; an integer dtype refuses fractions and values out
    of its range."""
    target = dtype.as_numpy_dtype
    if dtype.is_integer:
        if raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
            raise ServingError("INVALID_ARGUMENT", f"input {name!r} expects {dtype.name}; got "
                                                   "a non-integer number")
        info = np.iinfo(target)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise ServingError("INVALID_ARGUMENT", f"input {name!r}: value out of range for "
                                                   f"{dtype.name} [{info.min}, {info.max}]")
    return raw.astype(target)


def to_json(array: np.ndarray) -> Any:
    """Output arrays as JSON; byte strings become text, or {"b64"} when not UTF-8."""
    if array.dtype == object or array.dtype.kind == "S":
        def convert(item):
            if isinstance(item, bytes):
                try:
                    return item.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(item).decode()}
            return item
        return np.vectorize(convert, otypes=[object])(array).tolist() if array.size else \
            array.tolist()
    return array.tolist()


# --- request bodies -------------------------------------------------------------------

def parse_predict_body(body: dict, specs: dict[str, tf.TensorSpec]
                       ) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs from a row-format or columnar predict body; returns (inputs, row_format)."""
    if not isinstance(body, dict):
        raise ServingError("INVALID_ARGUMENT", "request body must be a JSON object")
    if ("instances" in body) == ("inputs" in body):
        raise ServingError("INVALID_ARGUMENT", "request must have exactly one of "
                                               "'instances' (row format) or 'inputs' (columnar)")
    if "instances" in body:
        return _row_inputs(body["instances"], specs), True
    return _columnar_inputs(body["inputs"], specs), False


def _row_inputs(instances: Any, specs: dict[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
    named = all(isinstance(row, dict) and "b64" not in row for row in instances)
    if not named:
        if len(specs) != 1:
            raise ServingError("INVALID_ARGUMENT", f"the signature has inputs {sorted(specs)}; "
                                                   "each instance must be an object naming them")
        (name, spec), = specs.items()
        return {name: to_array(name, instances, spec.dtype)}
    keys = set(instances[0])
    if any(set(row) != keys for row in instances):
        raise ServingError("INVALID_ARGUMENT", "every instance must have the same input names")
    return {key: to_array(key, [row[key] for row in instances], _dtype(key, specs))
            for key in keys}


def _columnar_inputs(inputs: Any, specs: dict[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict) and "b64" not in inputs:
        return {key: to_array(key, value, _dtype(key, specs)) for key, value in inputs.items()}
    if len(specs) != 1:
        raise ServingError("INVALID_ARGUMENT", f"the signature has inputs {sorted(specs)}; "
                                               "'inputs' must be an object naming them")
    (name, spec), = specs.items()
    return {name: to_array(name, inputs, spec.dtype)}


def _dtype(key: str, specs: dict[str, tf.TensorSpec]) -> tf.DType:
    if key not in specs:
        raise ServingError("INVALID_ARGUMENT", f"unknown input {key!r}; the signature takes "
                                               f"{sorted(specs)}")
    return specs[key].dtype


def format_predictions(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": to_json(next(iter(outputs.values())))}
        return {"outputs": {key: to_json(value) for key, value in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": to_json(next(iter(outputs.values())))}
    columns = {key: to_json(value) for key, value in outputs.items()}
    rows = len(next(iter(columns.values())))
    return {"predictions": [{key: columns[key][i] for key in columns} for i in range(rows)]}


# --- metrics -------------------------------------------------------------------------

METRICS_PATH = "/monitoring/prometheus/metrics"
_METRICS = (("requests", "Requests queued for server-side batching."),
            ("batches", "Model calls made by server-side batching."),
            ("rows", "Rows (examples) in those model calls; rows / batches = mean batch."),
            ("refused", "Requests refused with UNAVAILABLE because the batch queue was full."))


def prometheus_metrics(predictor: Predictor) -> str:
    """Batching counters per model in Prometheus' text format (no samples without batching)."""
    batcher = predictor.batcher
    per_model = batcher.snapshot() if batcher is not None else {}
    lines = ["# TYPE fer_serve_batching_enabled gauge",
             f"fer_serve_batching_enabled {int(batcher is not None)}"]
    for field, help_text in _METRICS:
        metric = f"fer_serve_batching_{field}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{model_name="{name}"}} {getattr(stats, field)}'
                  for name, stats in sorted(per_model.items())]
    if predictor.request_log is not None:
        lines += predictor.request_log.prometheus_lines()
    return "\n".join(lines) + "\n"


# --- the HTTP server ------------------------------------------------------------------

class RestServer(BoundedHTTPServer):
    def __init__(self, address: tuple[str, int], predictor: Predictor,
                 max_request_bytes: int, limits: Optional[HttpLimits] = None,
                 **options) -> None:
        super().__init__(address, RestHandler, limits or HttpLimits(), max_request_bytes,
                         **options)
        self.predictor = predictor


def internal_error_id() -> str:
    """A short id that a 500's caller quotes and the server log carries with the traceback."""
    return uuid.uuid4().hex[:12]


class RestHandler(PooledHandlerMixin, BaseHTTPRequestHandler):
    server: RestServer
    protocol_version = "HTTP/1.1"   # keep-alive: clients reuse one connection
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK and every keep-alive request costs ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib's signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        self._send_body(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_text(self, status: int, text: str) -> None:
        self._send_body(status, text.encode(), "text/plain; version=0.0.4")

    def _send_body(self, status: int, body: bytes, content_type: str,
                   headers: Optional[dict] = None) -> None:
        self.send_whole(status, body, {"Content-Type": content_type, **(headers or {})})

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _route(self) -> Optional[re.Match]:
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self._error(404, f"Malformed request: {self.command} {self.path}")
        return match

    def _version(self, match: re.Match) -> Optional[int]:
        raw = match.group("version")
        if raw is None:
            return None
        if not raw.isdigit():
            raise ServingError("INVALID_ARGUMENT", f"version must be an integer, got {raw!r}")
        return int(raw)

    def _handle(self, action) -> None:
        try:
            action()
        except ServingError as error:
            self._error(_HTTP_STATUS.get(error.code, 500), error.message)
        except DISCONNECTS:
            raise   # the client hung up: the server logs one line, there is no one to answer
        except Exception:  # a bug must cost one 500, not the server
            error_id = internal_error_id()
            log.exception("REST %s %s failed (error id %s)", self.command, self.path, error_id)
            self._error(500, f"internal error (id {error_id})")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == METRICS_PATH:
            self._send_text(200, prometheus_metrics(self.server.predictor))
            return
        match = self._route()
        if match is None:
            return
        if match.group("verb"):
            self._error(405, f"{match.group('verb')} needs POST")
            return
        self._handle(lambda: self._get(match))

    def _get(self, match: re.Match) -> None:
        manager = self.server.predictor.manager
        name, version, label = match.group("model"), self._version(match), match.group("label")
        if match.group("metadata"):
            model = manager.resolve(name, version, label)
            signatures = {key: json_format.MessageToDict(
                value, preserving_proto_field_name=True)
                          for key, value in model.signature_defs.items()}
            self._send(200, {"model_spec": {"name": name, "signature_name": "",
                                            "version": str(model.version)},
                             "metadata": {"signature_def": {"signature_def": signatures}}})
            return
        statuses = manager.status(name, version, label)
        self._send(200, {"model_version_status": [
            {"version": str(s.version), "state": s.state,
             "status": {"error_code": s.error_code, "error_message": s.error_message}}
            for s in statuses]})

    def do_POST(self) -> None:
        body = self.read_body()
        if body is None:
            return
        match = self._route()
        if match is None:
            return
        verb = match.group("verb")
        if match.group("metadata") or verb is None:
            self._error(405, f"POST is not supported on {self.path}; use GET")
            return
        if verb != "predict":
            self._error(400, f"unsupported verb :{verb}; this server implements :predict")
            return
        self._handle(lambda: self._predict(match, body))

    def _predict(self, match: re.Match, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ServingError("INVALID_ARGUMENT", f"malformed JSON: {error}")
        if not isinstance(body, dict):
            raise ServingError("INVALID_ARGUMENT", "request body must be a JSON object")
        predictor = self.server.predictor
        name, version, label = match.group("model"), self._version(match), match.group("label")
        signature = body.get("signature_name") or DEFAULT_SIGNATURE
        model = predictor.manager.resolve(name, version, label)
        inputs, row_format = parse_predict_body(body, model.input_specs(signature))
        outputs = predictor.run(model, inputs, signature)
        self._send(200, format_predictions(outputs, row_format),
                   {VERSION_HEADER: str(model.version)})
        # After the answer went out: logging adds nothing to the client's latency.
        if predictor.request_log is not None:
            predictor.request_log.log_arrays(model.name, model.version, signature, inputs,
                                             outputs,
                                             request_id(self.headers.get(REQUEST_ID_HEADER)))

    def do_PUT(self) -> None:
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT


def build_rest_server(predictor: Predictor, host: str, port: int, max_request_bytes: int,
                      limits: Optional[HttpLimits] = None, **options) -> RestServer:
    """A not yet started REST server; `options`: reuse_port, ssl_context
    (serving/http_server.py)."""
    return RestServer((host, port), predictor, max_request_bytes, limits, **options)
