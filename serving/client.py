"""Asks served FER models about faces over the TF Serving protocol and combines them.

`FerClient` speaks gRPC or REST to our embedded server and to the real TF Serving alike
(same protocols), with retries on an unavailable server; `classify` asks each model and
combines their answers with fer_pipeline.core.ensemble.combine. The `fer-client` command around it is
serving/client_cli.py.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fer_pipeline.core.config import MODEL_NAMES
from fer_pipeline.core.contract import (IMAGE_SIZE, INPUT_PIXELS, OUTPUT_PROBABILITIES,
                               OUTPUT_SALIENCY, SIGNATURE_EXPLAIN, class_names_for)
from fer_pipeline.serving.connection import diagnose
from fer_pipeline.serving.tls import ClientTLS
from fer_pipeline.core.ensemble import combine, shared_class_count
from fer_pipeline.core.errors import UserError, ConfigError, ServerUnreachable

DEFAULT_MODELS = MODEL_NAMES   # every registered model (core/config.py)


class ServerUnavailable(ServerUnreachable):
    """The server could not be reached even after the retries."""


class ServerError(Exception):
    """The server answered with an error (bad request, unknown model...)."""


class ModelNotServed(ServerError, UserError):
    """The server does not serve this model (gRPC NOT_FOUND, HTTP 404): for example the
    evaluation gate held it back, so it was never pushed."""


@dataclass
class ModelAnswer:
    model: str
    version: Optional[int]
    probabilities: np.ndarray        # float32 [n, 7] (a FER+ model: [n, 8])


@dataclass
class Explanation:
    """A model's answer with why: its `explain` signature (core/serving_export.py)."""
    model: str
    version: Optional[int]
    probabilities: np.ndarray        # float32 [n, 7] (a FER+ model: [n, 8])
    saliency: np.ndarray             # float32 [n, 7, 48, 48], each map scaled to [0, 1]


def with_retries(call: Callable[[], Any], is_unavailable: Callable[[BaseException], bool],
                 retries: int, backoff_s: float, what: str,
                 diagnose: Callable[[], Optional[str]] = lambda: None,
                 is_hopeless: Callable[[BaseException], bool] = lambda error: False) -> Any:
    """Runs `call`, retrying with exponential backoff while the server is unreachable.

    When it stays unreachable, or answers in a way no retry can fix (`is_hopeless`: the
    wrong protocol, a timeout), ServerUnavailable says why in one line: `diagnose()`'s
    finding about the address (serving/connection.py), else the error's own first line.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            hopeless = is_hopeless(error)
            if not hopeless and not is_unavailable(error):
                raise
            if hopeless or attempt == retries:
                tries = "" if hopeless else f" is not reachable after {attempt + 1} attempt(s)"
                raise ServerUnavailable(f"{what}{tries}: {diagnose() or _short(error)}") \
                    from None
            time.sleep(backoff_s * 2 ** attempt)


def _short(error: BaseException) -> str:
    details = getattr(error, "details", None)
    text = details() if callable(details) else str(error)
    return (text or type(error).__name__).splitlines()[0]


class FerClient:
    """Predicts with each served model over gRPC or REST; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", grpc_port: int = 8500, rest_port: int = 8501,
                 protocol: str = "grpc", timeout: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.2, tls: Optional[ClientTLS] = None) -> None:
        if protocol not in ("grpc", "rest"):
            raise ConfigError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        self.host, self.protocol = host, protocol
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.tls = tls           # None: plaintext, as TF Serving's ports by default
        self._stub = None
        self._ssl_context = tls.ssl_context() if tls is not None else None

    @property
    def port(self) -> int:
        return self.grpc_port if self.protocol == "grpc" else self.rest_port

    @property
    def address(self) -> str:
        return f"{self.protocol} server at {self.host}:{self.port}"

    def _call(self, call: Callable[[], Any]) -> Any:
        """`call` with retries; a connection failure becomes one ServerUnavailable line."""
        def diagnosis() -> Optional[str]:
            if self.tls is not None:
                return (self.tls.diagnose(self.host, self.port, self.timeout)
                        or diagnose(self.host, self.port, self.protocol, self.timeout,
                                    tls=True))
            return diagnose(self.host, self.port, self.protocol, self.timeout)

        grpc_call = self.protocol == "grpc"
        return with_retries(call, _grpc_unavailable if grpc_call else _rest_unavailable,
                            self.retries, self.backoff_s, self.address, diagnosis,
                            self._hopeless)

    def _hopeless(self, error: BaseException) -> bool:
        """Failures no retry fixes: the wrong protocol, TLS, or no answer in time."""
        if self.protocol == "grpc":
            return _grpc_hopeless(error)
        return isinstance(error, (http.client.BadStatusLine, socket.timeout, TimeoutError,
                                  ssl.SSLError)) \
            or isinstance(getattr(error, "reason", None), (socket.timeout, TimeoutError,
                                                           ssl.SSLError))

    def predict(self, model: str, images: np.ndarray,
                request_id: Optional[str] = None) -> ModelAnswer:
        """Probabilities of `images` (uint8 [n, 48, 48]) from the newest version of `model`.
        `request_id` goes with the request (x-request-id / X-Request-Id): the server logs
        it, and the monitor joins the models' answers to the same faces by it."""
        images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if self.protocol == "grpc":
            return self._call(lambda: self._predict_grpc(model, images, request_id))
        return self._call(lambda: self._predict_rest(model, images, request_id))

    # --- gRPC: uint8 tensors (2.3 KB per face) on the serving_uint8 signature ----------

    def _grpc_stub(self):
        if self._stub is None:
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc
            target = f"{self.host}:{self.grpc_port}"
            channel = (grpc.secure_channel(target, self.tls.grpc_credentials())
                       if self.tls is not None else grpc.insecure_channel(target))
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return self._stub

    def _predict_grpc(self, model: str, images: np.ndarray,
                      request_id: Optional[str] = None) -> ModelAnswer:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_uint8"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(images))
        request.output_filter.append("probabilities")
        metadata = (("x-request-id", request_id),) if request_id else None
        try:
            response = self._grpc_stub().Predict(request, timeout=self.timeout,
                                                 metadata=metadata)
        except grpc.RpcError as error:
            if _grpc_unavailable(error) or _grpc_hopeless(error):
                raise
            kind = ModelNotServed if error.code() == grpc.StatusCode.NOT_FOUND else ServerError
            raise kind(f"{model}: {error.code().name}: {error.details()}") from None
        version = response.model_spec.version.value if response.model_spec.HasField(
            "version") else None
        return ModelAnswer(model, version, tf.make_ndarray(response.outputs["probabilities"]))

    # --- REST: JSON ints on the serving_default signature -----------------------------

    def _rest_url(self, path: str) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.rest_port}{path}"

    def _rest_call(self, path: str, body: Optional[dict] = None,
                   headers: Optional[dict] = None) -> tuple[dict, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._rest_url(path), data=data, headers={
            "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self._ssl_context) as response:
                return json.loads(response.read()), response.headers
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", "")
            except ValueError:
                message = error.reason
            kind = ModelNotServed if error.code == 404 else ServerError
            raise kind(f"HTTP {error.code} on {path}: {message}") from None

    def _predict_rest(self, model: str, images: np.ndarray,
                      request_id: Optional[str] = None) -> ModelAnswer:
        body = {"signature_name": "serving_default", "instances": images.astype(int).tolist()}
        payload, headers = self._rest_call(f"/v1/models/{model}:predict", body,
                                           {"X-Request-Id": request_id} if request_id else None)
        probabilities = np.array([row["probabilities"] for row in payload["predictions"]],
                                 dtype=np.float32)
        version = headers.get("X-Model-Version")
        if version is None:  # the real TF Serving does not say; ask which version is up
            version = self.served_version(model)
        return ModelAnswer(model, int(version) if version is not None else None, probabilities)

    def served_version(self, model: str) -> Optional[int]:
        """The newest AVAILABLE version according to the REST status endpoint."""
        payload, _ = self._rest_call(f"/v1/models/{model}")
        available = [int(s["version"]) for s in payload.get("model_version_status", [])
                     if s.get("state") == "AVAILABLE"]
        return max(available) if available else None

    # --- explanations: the explain signature, over either protocol ---------------------

    def explain(self, model: str, images: np.ndarray) -> Explanation:
        """Probabilities and per-class saliency maps of `images` (uint8 [n, 48, 48])."""
        images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if self.protocol == "grpc":
            return self._call(lambda: self._explain_grpc(model, images))
        return self._call(lambda: self._explain_rest(model, images))

    def _explain_grpc(self, model: str, images: np.ndarray) -> Explanation:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = SIGNATURE_EXPLAIN
        request.inputs[INPUT_PIXELS].CopyFrom(tf.make_tensor_proto(images))
        request.output_filter.extend([OUTPUT_PROBABILITIES, OUTPUT_SALIENCY])
        try:
            response = self._grpc_stub().Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            if _grpc_unavailable(error) or _grpc_hopeless(error):
                raise
            raise ServerError(f"{model}: {error.code().name}: {error.details()}") from None
        version = response.model_spec.version.value if response.model_spec.HasField(
            "version") else None
        return Explanation(model, version,
                           tf.make_ndarray(response.outputs[OUTPUT_PROBABILITIES]),
                           tf.make_ndarray(response.outputs[OUTPUT_SALIENCY]))

    def _explain_rest(self, model: str, images: np.ndarray) -> Explanation:
        body = {"signature_name": SIGNATURE_EXPLAIN, "instances": images.astype(int).tolist()}
        payload, headers = self._rest_call(f"/v1/models/{model}:predict", body)
        rows = payload["predictions"]
        version = headers.get("X-Model-Version")
        if version is None:
            version = self.served_version(model)
        return Explanation(
            model, int(version) if version is not None else None,
            np.array([row[OUTPUT_PROBABILITIES] for row in rows], dtype=np.float32),
            np.array([row[OUTPUT_SALIENCY] for row in rows], dtype=np.float32))


def _grpc_unavailable(error: BaseException) -> bool:
    import grpc
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _grpc_hopeless(error: BaseException) -> bool:
    """A deadline that passed, or an address that answered in another protocol than gRPC's
    HTTP/2 (a REST port): retrying cannot help."""
    import grpc
    if not isinstance(error, grpc.RpcError):
        return False
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        error.code() == grpc.StatusCode.UNAVAILABLE
        and any(sign in details for sign in ("http/2", "handshake", "ssl", "tls")))


def _rest_unavailable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code == 503
    return isinstance(error, (urllib.error.URLError, ConnectionError, socket.timeout,
                              TimeoutError, http.client.HTTPException))


# --- combining the models ---------------------------------------------------------------

def classify(client: FerClient, images: np.ndarray, models: Sequence[str],
             tolerance: float) -> list[dict[str, Any]]:
    """Each model's answer for every image, and the ensemble decision, as JSON-ready dicts.

    A model the server does not serve is listed under "not_served" (model -> the server's
    message) and the decision is made with the models that are; ModelNotServed is raised
    only when none of them is served. Every model's request carries the same request id,
    so the server's logs tie the answers to these images together (the monitor's join).
    """
    answers, not_served = [], {}
    request_id = uuid.uuid4().hex
    for model in models:
        try:
            answers.append(client.predict(model, images, request_id))
        except ModelNotServed as error:
            not_served[model] = str(error)
    if not answers:
        raise ModelNotServed(f"none of {', '.join(models)} is served: "
                             + "; ".join(not_served.values()))
    # The models' classes, from the width of their answers: FER-2013's 7 or FER+'s 8; a
    # 7- and an 8-class model cannot be combined (one line, before any decision).
    names = class_names_for(shared_class_count(
        {a.model: int(np.shape(a.probabilities)[-1]) for a in answers}))
    results = []
    for row in range(len(images)):
        probabilities = {a.model: a.probabilities[row].tolist() for a in answers}
        decision = combine(probabilities, tolerance)
        results.append({
            "models": {a.model: {"version": a.version,
                                 "probabilities": dict(zip(names, probabilities[a.model])),
                                 "class_name": names[int(np.argmax(a.probabilities[row]))]}
                       for a in answers},
            "decision": asdict(decision),
            "not_served": not_served,
        })
    return results
