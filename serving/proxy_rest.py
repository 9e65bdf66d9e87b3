"""The logging proxy's REST side (serving/proxy.py): TF Serving's REST API forwarded as is.

Every request but `GET /monitoring/prometheus/metrics` (the proxy's own counters and its
request-log counters) goes to the upstream unchanged: method, path, body, Content-Type,
plus `X-Request-Id` (the client's, or one the proxy assigns, which is also sent back).
The upstream's status, body, Content-Type and Retry-After come back as they are. Each
worker thread keeps one keep-alive connection to the upstream; a connection the upstream
closed while idle is retried once on a new one. An upstream that cannot be reached is a
502 {"error": "<one line naming it>"}.

A successful `:predict` whose model logs is logged as fer-serve logs it: the request is
queued as its JSON text, and the writer thread turns both JSONs into the PredictRequest /
PredictResponse (serving/proxy_rest_log.py). `:classify` and `:regress` are forwarded but
not logged (fer-serve's REST side does not serve them either; over gRPC both are logged).
"""
from __future__ import annotations

import http.client
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Optional

from fer_pipeline.serving.http_server import BoundedHTTPServer, HttpLimits, PooledHandlerMixin
from fer_pipeline.serving.proxy_rest_log import RestRecords
from fer_pipeline.serving.request_log import REQUEST_ID_HEADER, request_id

if TYPE_CHECKING:
    from fer_pipeline.serving.proxy import LoggingProxy

__all__ = ["ProxyRestServer", "build_proxy_rest_server", "METRICS_PATH"]

log = logging.getLogger("fer-serve.proxy")

METRICS_PATH = "/monitoring/prometheus/metrics"
_PREDICT = re.compile(r"^/v1/models/(?P<model>[^/:]+)"
                      r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?:predict/?$")
_PASSED_BACK = ("Content-Type", "Retry-After", "X-Model-Version")
_UPSTREAM_ERRORS = (OSError, http.client.HTTPException)


class ProxyRestServer(BoundedHTTPServer):
    def __init__(self, proxy: "LoggingProxy", address: tuple[str, int], **options) -> None:
        from fer_pipeline.serving.proxy import UpstreamHealth

        config = proxy.config
        super().__init__(address, ProxyRestHandler, config.rest_limits or HttpLimits(),
                         config.max_request_bytes, **options)
        self.proxy = proxy
        self.upstream = config.upstream_rest
        self.timeout_s = config.timeout_s
        self.health = UpstreamHealth("REST", self.upstream) if self.upstream else None
        self.records = RestRecords(self.upstream, config.timeout_s) if self.upstream else None
        self._local = threading.local()

    def upstream_connection(self, fresh: bool = False) -> tuple[http.client.HTTPConnection,
                                                                bool]:
        """This worker's connection to the upstream, and whether it served before."""
        connection = getattr(self._local, "connection", None)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPConnection(self.upstream.host, self.upstream.port,
                                                    timeout=self.timeout_s)
            self._local.connection, self._local.used = connection, False
        used, self._local.used = self._local.used, True
        return connection, used


class ProxyRestHandler(PooledHandlerMixin, BaseHTTPRequestHandler):
    server: ProxyRestServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib's signature
        log.debug("%s " + format, self.address_string(), *args)

    def _error(self, status: int, message: str) -> None:
        self.send_whole(status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == METRICS_PATH:
            text = "\n".join(self.server.proxy.prometheus_lines()) + "\n"
            self.send_whole(200, text.encode(), {"Content-Type": "text/plain; version=0.0.4"})
            return
        self._forward(None)

    def do_POST(self) -> None:
        body = self.read_body()
        if body is not None:
            self._forward(body)

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _forward(self, body: Optional[bytes]) -> None:
        server = self.server
        if server.upstream is None:
            self._error(502, "this logging proxy forwards no REST (start it with "
                             "--upstream or --upstream-rest)")
            return
        rid = request_id(self.headers.get(REQUEST_ID_HEADER))
        headers = {REQUEST_ID_HEADER: rid}
        if self.headers.get("Content-Type"):
            headers["Content-Type"] = self.headers["Content-Type"]
        try:
            status, reply, passed = self._exchange(body, headers)
        except _UPSTREAM_ERRORS as error:
            self._error(502, server.health.down(_reason(error)))
            return
        server.health.up()
        passed[REQUEST_ID_HEADER] = rid
        self.send_whole(status, reply, passed)
        # After the answer went out, as fer-serve: logging adds nothing to the latency.
        if status == 200 and self.command == "POST" and body is not None:
            match = _PREDICT.match(self.path.split("?", 1)[0])
            if match is not None:
                server.records.log(server.proxy.request_log, match, body, reply,
                                   passed.get("X-Model-Version"), rid)

    def _exchange(self, body: Optional[bytes], headers: dict[str, str]
                  ) -> tuple[int, bytes, dict[str, str]]:
        """One request to the upstream; a reused connection that fails is retried once on
        a new one (the upstream may have closed it while it was idle)."""
        connection, used = self.server.upstream_connection()
        while True:
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                reply = response.read()
            except _UPSTREAM_ERRORS as error:
                connection.close()
                if not used or isinstance(error, TimeoutError):   # a slow upstream: no retry
                    raise
                connection, used = self.server.upstream_connection(fresh=True)
                continue
            if response.will_close:
                connection.close()
            passed = {key: response.headers[key] for key in _PASSED_BACK
                      if response.headers.get(key) is not None}
            return response.status, reply, passed


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def build_proxy_rest_server(proxy: "LoggingProxy", host: str, port: int) -> ProxyRestServer:
    """A not yet started REST side of `proxy` (TLS from its access config, if any)."""
    access = proxy.config.access
    context = access.rest_context() if access is not None else None
    return ProxyRestServer(proxy, (host, port), ssl_context=context)
