"""The PredictionLog of a REST `:predict` the logging proxy forwarded (serving/proxy_rest.py).

fer-serve logs a REST predict as the PredictRequest / PredictResponse TF Serving makes of
the JSON, with the version that answered. The proxy only has the two JSON texts, so on the
request-log writer thread (never on the request path) it turns them into the same protos:

* the dtypes come from the upstream's signature metadata
  (`GET /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata`), asked once per model and
  version and kept for METADATA_TTL_S seconds;
* the version that answered is the upstream's `X-Model-Version` header when it sends one
  (fer-serve does), else the version the URL names, else the version the metadata names.
  TF Serving's REST predict does not say which version answered, so for a few seconds
  after a version swap a record may carry the previous version.

The JSON is read with serving/rest.py's own parser (row and columnar formats, {"b64"}
strings, the signature's dtypes), so a record equals the one fer-serve writes itself.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from fer_pipeline.serving.model_manager import DEFAULT_SIGNATURE
from fer_pipeline.serving.request_log import RequestLogger, predict_protos
from fer_pipeline.serving.rest import parse_predict_body, to_array

if TYPE_CHECKING:
    import re

    from fer_pipeline.serving.proxy import Upstream

__all__ = ["RestRecords", "METADATA_TTL_S"]

METADATA_TTL_S = 10.0

# (model version, {signature: (input specs, output specs)})
_Metadata = tuple[int, dict[str, tuple[dict[str, tf.TensorSpec], dict[str, tf.TensorSpec]]]]


class RestRecords:
    """Queues forwarded REST predicts for the request log; builds their records later."""

    def __init__(self, upstream: "Upstream", timeout_s: float) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self._cache: dict[tuple, tuple[float, _Metadata]] = {}
        self._lock = threading.Lock()   # the writer thread is the only user; cheap insurance

    def log(self, logger: RequestLogger, match: "re.Match", body: bytes, reply: bytes,
            version_header: Optional[str], rid: str) -> None:
        name = match.group("model")
        url_version = int(match.group("version")) if match.group("version") else None
        label = match.group("label")

        def build() -> tuple[Any, Any, Any]:
            return self._protos(name, url_version, label, body, reply, version_header)
        logger.log_forwarded(name, "predict", build, len(body) + len(reply), rid)

    def _protos(self, name: str, url_version: Optional[int], label: Optional[str],
                body: bytes, reply: bytes, version_header: Optional[str]
                ) -> tuple[Any, Any, Any]:
        request = json.loads(body)
        signature = request.get("signature_name") or DEFAULT_SIGNATURE
        meta_version, signatures = self._metadata(name, url_version, label)
        if signature not in signatures:
            raise ValueError(f"the upstream's model {name} has no signature {signature!r}")
        input_specs, output_specs = signatures[signature]
        inputs, _ = parse_predict_body(request, input_specs)
        outputs = _outputs(json.loads(reply), output_specs)
        version = (int(version_header) if version_header and version_header.isdigit()
                   else url_version if url_version is not None else meta_version)
        return predict_protos(name, version, signature, inputs, outputs)

    def _metadata(self, name: str, version: Optional[int], label: Optional[str]) -> _Metadata:
        key = (name, version, label)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_S:
                return cached[1]
            path = f"/v1/models/{name}" + (f"/versions/{version}" if version is not None
                                           else f"/labels/{label}" if label else "")
            connection = http.client.HTTPConnection(self.upstream.host, self.upstream.port,
                                                    timeout=self.timeout_s)
            try:
                connection.request("GET", path + "/metadata")
                response = connection.getresponse()
                payload = response.read()
            finally:
                connection.close()
            if response.status != 200:
                raise ValueError(f"the upstream answered {response.status} for {path}/metadata")
            metadata = _parse_metadata(json.loads(payload))
            self._cache[key] = (time.monotonic(), metadata)
            return metadata


def _spec(tensor_info: dict) -> tf.TensorSpec:
    dtype = tensor_info.get("dtype", "DT_INVALID")
    enum = dtype if isinstance(dtype, int) else types_pb2.DataType.Value(dtype)
    return tf.TensorSpec(None, tf.as_dtype(enum))


def _parse_metadata(payload: dict) -> _Metadata:
    """TF Serving's REST metadata answer as (version, per signature: input and output
    specs)."""
    version = int(payload["model_spec"]["version"])
    definitions = payload["metadata"]["signature_def"]["signature_def"]
    signatures = {key: ({k: _spec(v) for k, v in d.get("inputs", {}).items()},
                        {k: _spec(v) for k, v in d.get("outputs", {}).items()})
                  for key, d in definitions.items()}
    return version, signatures


def _outputs(reply: dict, specs: dict[str, tf.TensorSpec]) -> dict[str, np.ndarray]:
    """The response's tensors from a row-format ("predictions") or columnar ("outputs")
    answer, as the signature's dtypes."""
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and all(isinstance(row, dict) for row in rows) and len(specs) > 1:
            return {key: to_array(key, [row[key] for row in rows], specs[key].dtype)
                    for key in rows[0]}
        (key, spec), = specs.items()
        return {key: to_array(key, rows, spec.dtype)}
    columns = reply["outputs"]
    if isinstance(columns, dict) and len(specs) > 1:
        return {key: to_array(key, value, specs[key].dtype) for key, value in columns.items()}
    (key, spec), = specs.items()
    return {key: to_array(key, columns, spec.dtype)}
