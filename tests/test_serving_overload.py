"""Slow, idle, departing and too many clients against the real server on 127.0.0.1: slow
requests get a 408 and cost no thread, overload is shed at once (503 / RESOURCE_EXHAUSTED),
an expired gRPC deadline runs no model, a disconnect is one log line, a bug answers 500
with an id the log carries."""
from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.batching import BatchingConfig
from fer_pipeline.serving.http_server import HttpLimits
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import push_version, save_tiny_model

MAX_REQUEST_BYTES = 1 << 20
GOOD = json.dumps({"instances": [[0] * 2304]}).encode()
PREDICT = "/v1/models/cnn:predict"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    push_version(str(root / "cnn"), 1, save_tiny_model(str(root / "template")))
    return write_model_server_config(str(root / "models.config"),
                                     [ModelSpec("cnn", str(root / "cnn"))])


def start(config: str, **overrides) -> FerServer:
    return FerServer(ServerConfig(config, port=0, rest_port=0,
                                  max_request_bytes=MAX_REQUEST_BYTES, **overrides)).start()


def raw_request(body: bytes = GOOD, path: str = PREDICT) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def post(server: FerServer, body: bytes = GOOD) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        connection.request("POST", PREDICT, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    finally:
        connection.close()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def read_response(reader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer from a connection that carries several."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, reader.read(length)


def grpc_request() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 48, 48), np.int32)))
    return request


# --- slow and idle clients ---------------------------------------------------------------

def test_slow_clients_get_408_within_the_timeout_and_hold_no_thread(config):
    server = start(config, rest_limits=HttpLimits(read_timeout_s=1.0, idle_timeout_s=30))
    try:
        threads_before = threading.active_count()
        slow = []
        for _ in range(50):   # headers announce 100,000 bytes; a few arrive, then silence
            sock = socket.create_connection(("127.0.0.1", server.rest_port))
            sock.sendall(b"POST /v1/models/cnn:predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"inst")
            slow.append(sock)
        time.sleep(0.3)
        assert threading.active_count() == threads_before   # no thread per connection
        assert post(server)[0] == 200                        # others are still answered
        started = time.monotonic()
        answers = [read_until_closed(sock, timeout=10) for sock in slow]
        waited = time.monotonic() - started
        assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[0]
        assert waited < 5   # closed by the server (1 s timeout), not by our 10 s recv limit
        for sock in slow:
            sock.close()
        assert threading.active_count() == threads_before
        # The server counts a connection closed just after closing it: a moment later.
        settle = time.monotonic() + 5
        while server.rest_server.open_connections() and time.monotonic() < settle:
            time.sleep(0.05)
        assert server.rest_server.open_connections() == 0
    finally:
        server.stop()


def test_keep_alive_is_kept_and_idle_connections_are_closed(config):
    server = start(config, rest_limits=HttpLimits(idle_timeout_s=1.0))
    try:
        sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)
        # Two requests in one write (pipelined), then a third on the same connection.
        sock.sendall(raw_request() + raw_request())
        reader = sock.makefile("rb")
        for answer in range(3):
            status, body = read_response(reader)
            assert status == 200 and len(json.loads(body)["predictions"]) == 1
            if answer == 1:
                sock.sendall(raw_request())
        # Now idle: the server closes it after about a second.
        started = time.monotonic()
        assert reader.read() == b""
        assert time.monotonic() - started < 5
        sock.close()
    finally:
        server.stop()


# --- overload ----------------------------------------------------------------------------

def _hog_the_only_worker(server: FerServer) -> socket.socket:
    """A request refused for its size whose body never comes: the one worker drains it
    until the read timeout, so the next whole request finds every worker busy."""
    hog = socket.create_connection(("127.0.0.1", server.rest_port))
    hog.sendall(f"POST {PREDICT} HTTP/1.1\r\nContent-Length: {MAX_REQUEST_BYTES * 2}\r\n\r\n"
                .encode())
    time.sleep(0.3)
    return hog


def test_rest_overload_is_a_503_with_retry_after_at_once(config):
    server = start(config, rest_limits=HttpLimits(read_timeout_s=5, workers=1, max_queued=0,
                                                  max_connections=4))
    try:
        hog = _hog_the_only_worker(server)
        status, payload, headers = post(server)   # http.client's 10 s timeout: no hang
        assert status == 503 and headers["Retry-After"] == "1", payload
        assert "overloaded" in payload["error"]
        idle = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(3)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", server.rest_port))
        assert read_until_closed(extra, timeout=10).startswith(b"HTTP/1.1 503")
        for sock in idle + [hog, extra]:
            sock.close()
        time.sleep(0.5)
        assert post(server)[0] == 200   # shed, not broken
    finally:
        server.stop()


def test_grpc_overload_is_resource_exhausted_at_once(config):
    # A 1.5 s batch timeout keeps the first call in the server while the second arrives.
    server = start(config, batching=True, grpc_workers=1, grpc_max_concurrent_rpcs=1,
                   batching_config=BatchingConfig(max_batch_size=32, batch_timeout_s=1.5))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        first = stub.Predict.future(grpc_request(), timeout=10)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(grpc_request(), timeout=1.0)   # a hang would be DEADLINE_EXCEEDED
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.result().outputs["probabilities"].tensor_shape.dim[0].size == 1
    finally:
        channel.close()
        server.stop()


def test_grpc_threads_are_all_started_up_front_so_load_does_not_add_any(config):
    def grpc_threads() -> int:
        return sum(t.name.startswith("grpc") for t in threading.enumerate())

    server = start(config, grpc_workers=6)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        assert grpc_threads() == 6   # before any call
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        calls = [stub.Predict.future(grpc_request(), timeout=10) for _ in range(12)]
        assert all(call.result().outputs["probabilities"].tensor_shape.dim[0].size == 1
                   for call in calls)
        assert grpc_threads() == 6
    finally:
        channel.close()
        server.stop()
    assert grpc_threads() == 0   # stopped with the server, not left running


def test_an_expired_grpc_deadline_runs_no_model(config):
    server = start(config, batching=True,
                   batching_config=BatchingConfig(max_batch_size=32, batch_timeout_s=1.0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as expired:
            stub.Predict(grpc_request(), timeout=0.3)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.5)   # the batch it waited in has closed
        stats = server.predictor.batcher.stats
        assert (stats.requests, stats.batches, stats.rows) == (1, 0, 0)
    finally:
        channel.close()
        server.stop()


# --- disconnects and bugs ----------------------------------------------------------------

def test_a_client_that_hangs_up_is_one_info_line(config, caplog):
    server = start(config, batching=True,
                   batching_config=BatchingConfig(max_batch_size=32, batch_timeout_s=0.5))
    try:
        with caplog.at_level(logging.INFO, logger="fer_pipeline.serving"):
            sock = socket.create_connection(("127.0.0.1", server.rest_port))
            sock.sendall(raw_request())
            # Closing with SO_LINGER 0 resets the connection: the answer meets a dead peer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            time.sleep(1.5)
        lines = [record for record in caplog.records
                 if record.name.startswith("fer_pipeline.serving")]
        assert len(lines) == 1, [record.getMessage() for record in lines]
        assert lines[0].levelno == logging.INFO and lines[0].exc_info is None
        assert "went away" in lines[0].getMessage()
        assert post(server)[0] == 200
    finally:
        server.stop()


def test_a_bug_answers_internal_error_with_the_id_the_log_carries(config, caplog,
                                                                   monkeypatch):
    server = start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("secret detail 42")
        monkeypatch.setattr(server.predictor, "run", broken)
        with caplog.at_level(logging.ERROR, logger="fer_pipeline.serving"):
            status, payload, _ = post(server)
            with pytest.raises(grpc.RpcError) as failed:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    grpc_request(), timeout=10)
        assert status == 500 and failed.value.code() == grpc.StatusCode.INTERNAL
        for answer in (payload["error"], failed.value.details()):
            assert answer.startswith("internal error (id ") and "secret" not in answer
            error_id = answer.split("id ")[1].rstrip(")")
            logged = [record for record in caplog.records if error_id in record.getMessage()]
            assert len(logged) == 1 and logged[0].exc_info[0] is RuntimeError
    finally:
        channel.close()
        server.stop()
