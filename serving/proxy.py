"""`fer-serve --upstream HOST`: a logging proxy in front of any TF-Serving-protocol server.

The released tensorflow_model_server has no request logger (it refuses to start with a
logging_config), so behind TF Serving in Docker there is nothing to monitor. In this mode
fer-serve loads no model: it forwards TF Serving's gRPC API (PredictionService: Predict,
Classify, Regress, MultiInference, GetModelMetadata; ModelService: GetModelStatus) and
REST API (serving/proxy_rest.py) to an upstream server and writes the PredictionLogs that
fer-serve writes when it serves itself, from the logging_config of its own
`--model-config` (re-read every --poll-seconds), with serving/request_log.py's writer,
sampling, bounds and request ids. The pattern is KServe's request-logger sidecar.

* Logging is asynchronous: the request path forwards bytes untouched, parses only the
  small response (for the model name that decides sampling) and queues the serialized
  request and response; the writer thread parses them into the record.
* The request id (gRPC metadata `x-request-id`, the client's or a new one) is forwarded
  upstream and logged in `log_metadata.request_origin`, as fer-serve does.
* Errors from upstream pass through with their code and message. An upstream that cannot
  be reached answers UNAVAILABLE (REST: 502) with one line naming it; the proxy keeps
  serving and logs one line when the upstream goes down and one when it is back.
* ModelService.HandleReloadConfigRequest is refused (UNIMPLEMENTED), never forwarded:
  TF Serving checks no caller, so forwarding would let anyone who reaches the proxy
  replace what the upstream serves, and the base paths it names are the upstream's
  (e.g. /models/... in the container), which the proxy cannot check against
  --allowed-root; the logging_config would also stop matching what is served. Change the
  upstream's config where it runs and the proxy's models.config beside it.

The upstream is reached in plaintext (a sidecar on the same host or pod); the proxy's own
ports take --ssl-config-file like fer-serve's.
"""
from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2,
                                     regression_pb2)

from fer_pipeline.core.errors import ConfigError, ResourceError
from fer_pipeline.core.serving_root import GRPC_PORT, REST_PORT, ConfigFileWatcher, \
    RequestLogSpec
from fer_pipeline.serving.request_log import RequestLogConfig, RequestLogger, request_id
from fer_pipeline.serving.thread_pool import started_thread_pool

__all__ = ["ProxyConfig", "LoggingProxy", "add_proxy_arguments", "proxy_requested",
           "proxy_config", "run_proxy", "Upstream"]

log = logging.getLogger("fer-serve.proxy")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
# Logged methods: the PredictionLog field they fill, and the response class whose
# model_spec names the model (and the version that answered).
LOGGED = {"Predict": ("predict", predict_pb2.PredictRequest, predict_pb2.PredictResponse),
          "Classify": ("classify", classification_pb2.ClassificationRequest,
                       classification_pb2.ClassificationResponse),
          "Regress": ("regress", regression_pb2.RegressionRequest,
                      regression_pb2.RegressionResponse),
          "MultiInference": ("multi_inference", inference_pb2.MultiInferenceRequest,
                             inference_pb2.MultiInferenceResponse)}
FORWARDED = {PREDICTION_SERVICE: ("Predict", "Classify", "Regress", "MultiInference",
                                  "GetModelMetadata"),
             MODEL_SERVICE: ("GetModelStatus",)}
RELOAD_REFUSED = ("the logging proxy does not forward HandleReloadConfigRequest: change the "
                  "upstream server's config where it runs (and the proxy's --model-config "
                  "for its request logs)")
# Metadata gRPC itself sets; everything else the client sent travels upstream.
_HOP_METADATA = ("user-agent", "x-request-id")


@dataclass(frozen=True)
class Upstream:
    """Where one protocol is forwarded: host and port."""
    host: str
    port: int

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, flag: str) -> "Upstream":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{flag} {text!r}: expected HOST:PORT, e.g. localhost:8500")
        return cls(host.strip("[]"), int(port))


@dataclass
class ProxyConfig:
    model_config: str                      # read for its logging_config only
    upstream_grpc: Optional[Upstream] = None
    upstream_rest: Optional[Upstream] = None
    host: str = "127.0.0.1"
    port: int = 8500                       # 0: any free port
    rest_port: int = 8501
    poll_seconds: float = 1.0
    timeout_s: float = 30.0                # per forwarded call, unless its deadline is sooner
    max_request_bytes: int = 16 * 1024 * 1024
    grpc_workers: int = 32
    request_log: RequestLogConfig = field(default_factory=RequestLogConfig)
    access: Any = None                     # serving/access.py's AccessConfig (TLS), or None
    rest_limits: Any = None                # serving/http_server.py's HttpLimits, or None


class LoggingConfigWatcher:
    """Which models log, and how: the logging_config of models.config, re-read by a
    background thread when the file changes (a bad edit keeps the last good config)."""

    def __init__(self, path: str, poll_seconds: float) -> None:
        self.path = path
        self.poll_seconds = poll_seconds
        self._config = ConfigFileWatcher(path)
        self._specs: dict[str, RequestLogSpec] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            self._read()
        except (OSError, ValueError) as error:
            raise ConfigError(f"--model-config {self.path}: {error}") from None

    def spec_for(self, name: str) -> Optional[RequestLogSpec]:
        return self._specs.get(name)

    def models(self) -> list[str]:
        return sorted(self._specs)

    def _read(self) -> None:
        specs, error = self._config.read()
        if error:
            log.error("cannot re-read %s, keeping its last logging_config: %s", self.path,
                      error)
        if specs is not None:
            self._specs = {spec.name: spec.request_log for spec in specs if spec.request_log}

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                self._read()
        self._thread = threading.Thread(target=loop, name="proxy-config", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class UpstreamHealth:
    """Says once when an upstream becomes unreachable and once when it answers again."""

    def __init__(self, what: str, upstream: Upstream) -> None:
        self.what, self.upstream = what, upstream
        self.failures = 0
        self._down = False
        self._lock = threading.Lock()

    def message(self, reason: str) -> str:
        return (f"upstream TF Serving {self.what} at {self.upstream.target} is unreachable "
                f"({reason}); is it running?")

    def down(self, reason: str) -> str:
        line = self.message(reason)
        with self._lock:
            self.failures += 1
            changed, self._down = not self._down, True
        if changed:
            log.warning("%s", line)
        return line

    def up(self) -> None:
        if self._down:
            with self._lock:
                changed, self._down = self._down, False
            if changed:
                log.info("upstream TF Serving %s at %s answers again", self.what,
                         self.upstream.target)


def _unreachable(error: grpc.RpcError) -> Optional[str]:
    """The reason when a call failed because the upstream could not be reached (not an
    UNAVAILABLE the upstream itself answered, e.g. its batch queue being full)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = error.details() or ""
    lowered = details.lower()
    for marker, reason in (("connection refused", "connection refused"),
                           ("failed to connect", "cannot connect"),
                           ("dns resolution failed", "unknown host"),
                           ("socket closed", "connection closed"),
                           ("connection reset", "connection reset")):
        if marker in lowered:
            return reason
    return None


class GrpcForwarder:
    """The proxy's gRPC side: generic handlers that pass bytes both ways."""

    def __init__(self, upstream: Upstream, logger: RequestLogger, timeout_s: float,
                 max_message_bytes: int) -> None:
        self.upstream = upstream
        self.logger = logger
        self.timeout_s = timeout_s
        self.health = UpstreamHealth("gRPC", upstream)
        self.channel = grpc.insecure_channel(upstream.target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self._calls = {f"/{service}/{method}": self.channel.unary_unary(
            f"/{service}/{method}") for service, methods in FORWARDED.items()
            for method in methods}

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        out = []
        for service, methods in FORWARDED.items():
            table = {method: grpc.unary_unary_rpc_method_handler(
                self._handler(f"/{service}/{method}", LOGGED.get(method)))
                for method in methods}
            if service == MODEL_SERVICE:
                table["HandleReloadConfigRequest"] = grpc.unary_unary_rpc_method_handler(
                    _refuse_reload)
            out.append(grpc.method_handlers_generic_handler(service, table))
        return out

    def _handler(self, path: str, logged: Optional[tuple]) -> Callable[[bytes, Any], bytes]:
        call = self._calls[path]

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            given = ""
            metadata = []
            for key, value in context.invocation_metadata() or ():
                if key == "x-request-id" and isinstance(value, str):
                    given = value
                elif key not in _HOP_METADATA and not key.startswith(("grpc-", ":")):
                    metadata.append((key, value))
            rid = request_id(given)
            metadata.append(("x-request-id", rid))
            remaining = context.time_remaining()
            timeout = self.timeout_s if remaining is None else min(remaining, self.timeout_s)
            try:
                response = call(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as error:
                reason = _unreachable(error)
                if reason is not None:
                    context.abort(grpc.StatusCode.UNAVAILABLE, self.health.down(reason))
                context.abort(error.code(), error.details() or "")
            self.health.up()
            if logged is not None:
                self._log(logged, request, response, rid)
            return response
        return forward

    def _log(self, logged: tuple, request: bytes, response: bytes, rid: str) -> None:
        kind, request_class, response_class = logged
        answer = response_class.FromString(response)   # small: scores, not the image
        spec = (answer.model_spec if kind != "multi_inference" else
                answer.results[0].model_spec if answer.results else None)
        if spec is None or not spec.name:
            return

        def build() -> tuple[Any, Any, Any]:
            return spec, request_class.FromString(request), answer
        self.logger.log_forwarded(spec.name, kind, build, len(request) + len(response), rid)

    def close(self) -> None:
        self.channel.close()


def _refuse_reload(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, RELOAD_REFUSED)


class LoggingProxy:
    """gRPC and REST forwarding with request logs; `start()` returns once both listen."""

    def __init__(self, config: ProxyConfig) -> None:
        if config.upstream_grpc is None and config.upstream_rest is None:
            raise ConfigError("the logging proxy needs --upstream, --upstream-grpc or "
                              "--upstream-rest")
        self.config = config
        self.watcher = LoggingConfigWatcher(config.model_config, config.poll_seconds)
        self.request_log = RequestLogger(self.watcher.spec_for, config.request_log)
        self.grpc = None
        self.grpc_server = None
        self._grpc_pool = None
        self.rest_server = None
        self.grpc_port = 0
        self.rest_port = 0

    def start(self) -> "LoggingProxy":
        from fer_pipeline.serving.proxy_rest import build_proxy_rest_server
        from fer_pipeline.serving.server import bind_failure, check_ports_free

        config, host = self.config, self.config.host
        access = config.access
        ports = [("REST", config.rest_port, "--rest-port")]
        if config.upstream_grpc is not None:
            ports.insert(0, ("gRPC", config.port, "--port"))
        check_ports_free(host, ports)
        self.watcher.start()
        self.request_log.start()
        if config.upstream_grpc is not None:
            self.grpc = GrpcForwarder(config.upstream_grpc, self.request_log, config.timeout_s,
                                      config.max_request_bytes)
            self._grpc_pool = started_thread_pool(config.grpc_workers, "proxy")
            self.grpc_server = grpc.server(
                self._grpc_pool,
                handlers=self.grpc.handlers(), maximum_concurrent_rpcs=2 * config.grpc_workers,
                options=[("grpc.max_receive_message_length", config.max_request_bytes),
                         ("grpc.max_send_message_length", config.max_request_bytes),
                         ("grpc.so_reuseport", 0)])
            credentials = access.grpc_credentials() if access is not None else None
            address = f"{host}:{config.port}"
            try:
                self.grpc_port = (self.grpc_server.add_secure_port(address, credentials)
                                  if credentials is not None
                                  else self.grpc_server.add_insecure_port(address))
            except RuntimeError as error:
                self.stop()
                raise ResourceError(bind_failure("gRPC", host, config.port, "--port",
                                                 error)) from None
            self.grpc_server.start()
        try:
            self.rest_server = build_proxy_rest_server(self, host, config.rest_port)
        except OSError as error:
            self.stop()
            raise ResourceError(bind_failure("REST", host, config.rest_port, "--rest-port",
                                             error)) from None
        self.rest_port = self.rest_server.server_address[1]
        self.rest_server.start()
        return self

    def stop(self) -> None:
        if self.rest_server is not None:
            self.rest_server.stop()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1).wait()
            self._grpc_pool.shutdown(wait=True)
        if self.grpc is not None:
            self.grpc.close()
        self.watcher.stop()
        self.request_log.stop()   # after the last request: writes what is queued

    def prometheus_lines(self) -> list[str]:
        lines = ["# HELP fer_serve_proxy_upstream_unreachable_total Requests answered "
                 "UNAVAILABLE / 502 because the upstream could not be reached.",
                 "# TYPE fer_serve_proxy_upstream_unreachable_total counter"]
        for protocol, health in (("grpc", self.grpc.health if self.grpc else None),
                                 ("rest", getattr(self.rest_server, "health", None))):
            if health is not None:
                lines.append(f'fer_serve_proxy_upstream_unreachable_total'
                             f'{{protocol="{protocol}"}} {health.failures}')
        return lines + self.request_log.prometheus_lines()


# --- the command line -------------------------------------------------------------------

def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="HOST",
                        help="logging proxy mode: forward to the TF Serving at HOST (gRPC "
                             f"{GRPC_PORT}, REST {REST_PORT}) and write request logs from "
                             "--model-config's logging_config; no model is loaded here")
    parser.add_argument("--upstream-grpc", metavar="HOST:PORT",
                        help="logging proxy mode: the upstream's gRPC address")
    parser.add_argument("--upstream-rest", metavar="HOST:PORT",
                        help="logging proxy mode: the upstream's REST address")
    parser.add_argument("--upstream-timeout-s", type=float, default=30.0,
                        help="longest a forwarded request may take upstream (a gRPC "
                             "client's shorter deadline wins)")


def proxy_requested(args: argparse.Namespace) -> bool:
    return bool(args.upstream or args.upstream_grpc or args.upstream_rest)


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    """The ProxyConfig of fer-serve's parsed flags; ConfigError for a bad address."""
    upstream_grpc = upstream_rest = None
    if args.upstream:
        host = args.upstream.strip("[]")
        if not host or "/" in host:
            raise ConfigError(f"--upstream {args.upstream!r}: expected a host name or address "
                              "(the standard ports are used; --upstream-grpc and "
                              "--upstream-rest take HOST:PORT)")
        upstream_grpc, upstream_rest = Upstream(host, GRPC_PORT), Upstream(host, REST_PORT)
    if args.upstream_grpc:
        upstream_grpc = Upstream.parse(args.upstream_grpc, "--upstream-grpc")
    if args.upstream_rest:
        upstream_rest = Upstream.parse(args.upstream_rest, "--upstream-rest")
    if args.upstream_timeout_s <= 0:
        raise ConfigError("--upstream-timeout-s must be positive")
    return ProxyConfig(args.model_config, upstream_grpc, upstream_rest, args.host, args.port,
                       args.rest_port, args.poll_seconds, args.upstream_timeout_s,
                       args.max_request_bytes, request_log=args.request_log_config,
                       access=args.access, rest_limits=args.rest_limits)


def run_proxy(args: argparse.Namespace) -> int:
    """fer-serve's main in proxy mode: serves until SIGINT or SIGTERM."""
    proxy = LoggingProxy(proxy_config(args)).start()
    config = proxy.config
    sides = []
    if config.upstream_grpc is not None:
        sides.append(f"gRPC on {config.host}:{proxy.grpc_port} -> {config.upstream_grpc.target}")
    rest_target = config.upstream_rest.target if config.upstream_rest else "(metrics only)"
    sides.append(f"REST on http://{config.host}:{proxy.rest_port} -> {rest_target}")
    print(f"fer-serve: logging proxy: {', '.join(sides)}; request logs for "
          f"{proxy.watcher.models() or 'no model (no logging_config)'}", flush=True)
    from fer_pipeline.serving.server import serve_until_signalled
    return serve_until_signalled(proxy.stop)
