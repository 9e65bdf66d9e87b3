"""The logging proxy (serving/proxy.py, serving/proxy_rest.py) in front of a real upstream.

Upstreams: an embedded fer-serve (the only TF-Serving-protocol server installable here)
and, when `tensorflow_model_server` is on PATH, the real TF Serving (absent otherwise).
The proxy must answer as the upstream does over gRPC and REST, pass errors through, write
one PredictionLog per request at sampling rate 1.0 with the request id (the very records
fer-serve writes when it serves itself), and say in one line when the upstream is down.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from fer_pipeline.components.monitor.reading import decode_record
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.net import free_port
from fer_pipeline.core.serving_root import ModelSpec, RequestLogSpec, write_model_server_config
from fer_pipeline.serving.proxy import RELOAD_REFUSED, LoggingProxy, ProxyConfig, Upstream
from fer_pipeline.serving.request_log import read_logs
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import (example_bytes, push_version, random_images, save_tiny_model,
                                    start_server_process)

# The real TF Serving joins as a second upstream only where it is installed: elsewhere its
# cases do not exist rather than skip three times (tests/test_serving_conformance.py already
# reports, once per case, that tensorflow_model_server is not on PATH).
UPSTREAMS = ["embedded"] + (["tfserving"] if shutil.which("tensorflow_model_server") else [])


def _config(path, base: str, prefix: str | None) -> str:
    log = RequestLogSpec(prefix, 1.0) if prefix else None
    return write_model_server_config(str(path), [ModelSpec("cnn", base, request_log=log)])


@pytest.fixture(scope="module", params=UPSTREAMS)
def setup(request, tmp_path_factory):
    """The upstream (logging its own requests when it is fer-serve, to compare with) and
    the proxy in front of it, logging every request of cnn."""
    root = tmp_path_factory.mktemp("proxy")
    push_version(str(root / "cnn"), 1, save_tiny_model(str(root / "template"), bias_class=3))
    proxy_logs, upstream_logs = root / "proxy_logs", root / "upstream_logs"
    process = server = None
    if request.param == "embedded":
        server = FerServer(ServerConfig(
            _config(root / "upstream.config", str(root / "cnn"),
                    str(upstream_logs / "cnn" / "requests")), port=0, rest_port=0)).start()
        grpc_port, rest_port = server.grpc_port, server.rest_port
    else:
        grpc_port, rest_port = free_port(), free_port()
        process = start_server_process(_config(root / "upstream.config", str(root / "cnn"),
                                               None), grpc_port, rest_port, ["cnn"],
                                       "--server", "tfserving")
    proxy = LoggingProxy(ProxyConfig(
        _config(root / "proxy.config", str(root / "cnn"), str(proxy_logs / "cnn" / "requests")),
        Upstream("127.0.0.1", grpc_port), Upstream("127.0.0.1", rest_port),
        port=0, rest_port=0)).start()
    channels = {side: grpc.insecure_channel(f"127.0.0.1:{port}")
                for side, port in (("direct", grpc_port), ("proxy", proxy.grpc_port))}
    yield {"kind": request.param, "proxy": proxy, "upstream": server, "channels": channels,
           "rest": {"direct": rest_port, "proxy": proxy.rest_port},
           "proxy_logs": str(proxy_logs), "upstream_logs": str(upstream_logs)}
    for channel in channels.values():
        channel.close()
    proxy.stop()
    if server is not None:
        server.stop()
    if process is not None:
        process.terminate()
        process.wait(timeout=30)


def _stub(setup, side: str):
    return prediction_service_pb2_grpc.PredictionServiceStub(setup["channels"][side])


def _rest(setup, side: str, method: str, path: str, body: bytes | None = None,
          request_id: str | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", setup["rest"][side], timeout=30)
    headers = {"X-Request-Id": request_id} if request_id else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload, dict(response.headers)


def _predict_request(seed: int) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.model_spec.signature_name = "serving_uint8"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(random_images(1, seed)))
    return request


def _wait_written(setup, count: int) -> None:
    deadline = time.monotonic() + 20
    while sum(c.written for c in setup["proxy"].request_log.counts().values()) < count:
        assert time.monotonic() < deadline, setup["proxy"].request_log.counts()
        time.sleep(0.05)


def test_grpc_answers_as_direct_and_passes_errors_through(setup):
    request = _predict_request(1)
    answers = {side: _stub(setup, side).Predict(request, timeout=30)
               for side in ("direct", "proxy")}
    assert answers["proxy"] == answers["direct"]
    assert answers["proxy"].model_spec.version.value == 1
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "cnn"
    assert (_stub(setup, "proxy").GetModelMetadata(metadata, timeout=30)
            == _stub(setup, "direct").GetModelMetadata(metadata, timeout=30))
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "cnn"
    statuses = [model_service_pb2_grpc.ModelServiceStub(setup["channels"][side])
                .GetModelStatus(status, timeout=30) for side in ("direct", "proxy")]
    assert statuses[0] == statuses[1] and statuses[1].model_version_status[0].version == 1

    missing = predict_pb2.PredictRequest()
    missing.model_spec.name = "nope"
    errors = []
    for side in ("direct", "proxy"):
        with pytest.raises(grpc.RpcError) as error:
            _stub(setup, side).Predict(missing, timeout=30)
        errors.append((error.value.code(), error.value.details()))
    assert errors[0] == errors[1] and errors[1][0] == grpc.StatusCode.NOT_FOUND
    if setup["kind"] == "embedded":   # fer-serve has no Regress: UNIMPLEMENTED passes
        regress = regression_pb2.RegressionRequest()
        regress.model_spec.name = "cnn"
        with pytest.raises(grpc.RpcError) as error:
            _stub(setup, "proxy").Regress(regress, timeout=30)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as error:   # never forwarded (serving/proxy.py)
        model_service_pb2_grpc.ModelServiceStub(setup["channels"]["proxy"]) \
            .HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=30)
    assert (error.value.code(), error.value.details()) == (grpc.StatusCode.UNIMPLEMENTED,
                                                           RELOAD_REFUSED)


def test_rest_answers_as_direct_and_passes_errors_through(setup):
    images = random_images(2, seed=2).astype(int).tolist()
    cases = [("GET", "/v1/models/cnn", None), ("GET", "/v1/models/cnn/metadata", None),
             ("POST", "/v1/models/cnn:predict", json.dumps({"instances": images}).encode()),
             ("POST", "/v1/models/cnn/versions/1:predict",
              json.dumps({"inputs": {"pixels": images}}).encode()),
             ("GET", "/v1/models/nope", None),
             ("POST", "/v1/models/cnn:predict", b"{not json")]
    for method, path, body in cases:
        direct = _rest(setup, "direct", method, path, body)
        proxied = _rest(setup, "proxy", method, path, body, request_id="r-1")
        assert proxied[:2] == direct[:2], (method, path)
        assert proxied[2]["X-Request-Id"] == "r-1"
    assert [s for s, *_ in (_rest(setup, "proxy", m, p, b) for m, p, b in cases)] == \
        [200, 200, 200, 200, 404, 400]


def test_the_proxy_logs_each_request_once_with_its_id_as_fer_serve_does(setup):
    proxy = setup["proxy"]
    before = sum(c.written for c in proxy.request_log.counts().values())
    stub = _stub(setup, "proxy")
    sent = {}
    for index in range(3):
        rid = f"grpc-{index}"
        sent[rid] = _predict_request(10 + index)
        stub.Predict(sent[rid], timeout=30, metadata=(("x-request-id", rid),))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "cnn"
    classify.input.example_list.examples.add().ParseFromString(
        example_bytes(random_images(1, 20)[0]))
    stub.Classify(classify, timeout=30, metadata=(("x-request-id", "classify-0"),))
    rest_body = json.dumps({"signature_name": "serving_uint8",
                            "instances": random_images(1, 21).astype(int).tolist()}).encode()
    status, answer, headers = _rest(setup, "proxy", "POST", "/v1/models/cnn:predict",
                                    rest_body, request_id="rest-0")
    assert status == 200
    _rest(setup, "proxy", "GET", "/v1/models/cnn")          # not a predict: not logged
    _wait_written(setup, before + 5)

    records = list(read_logs(setup["proxy_logs"]))[before:]
    assert [r.log_metadata.request_origin for r in records] == [
        "grpc-0", "grpc-1", "grpc-2", "classify-0", "rest-0"]
    for record in records[:3]:
        assert record.predict_log.request == sent[record.log_metadata.request_origin]
        assert record.log_metadata.model_spec.version.value == 1
        assert record.log_metadata.sampling_config.sampling_rate == 1.0
    assert records[3].classify_log.request == classify
    rest_log = records[4].predict_log
    np.testing.assert_array_equal(tf.make_ndarray(rest_log.request.inputs["pixels"]),
                                  random_images(1, 21))
    np.testing.assert_allclose(tf.make_ndarray(rest_log.response.outputs["probabilities"]),
                               [answer["predictions"][0]["probabilities"]], atol=1e-6)
    # The monitor reads them, joined by the request id.
    keys = [answer.key for record in records[:3] for answer in decode_record(
        record.SerializeToString(), None, None, MonitorConfig()) if hasattr(answer, "key")]
    assert keys == [b"id:grpc-0#0", b"id:grpc-1#0", b"id:grpc-2#0"]
    if setup["kind"] == "embedded":
        # The upstream fer-serve logged the same requests itself (the id travelled with
        # them): the proxy's records are the very records fer-serve writes.
        deadline = time.monotonic() + 20
        while True:
            own = {r.log_metadata.request_origin: r for r in read_logs(setup["upstream_logs"])}
            if {r.log_metadata.request_origin for r in records} <= set(own):
                break
            assert time.monotonic() < deadline, sorted(own)
            time.sleep(0.05)
        for record in records:
            theirs = own[record.log_metadata.request_origin]
            theirs.log_metadata.timestamp_secs = record.log_metadata.timestamp_secs
            assert record == theirs, record.log_metadata.request_origin


def test_an_upstream_that_is_down_is_one_line_and_the_proxy_keeps_serving(tmp_path):
    dead = Upstream("127.0.0.1", free_port())
    config = _config(tmp_path / "models.config", str(tmp_path / "cnn"),
                     str(tmp_path / "logs" / "cnn" / "requests"))
    proxy = LoggingProxy(ProxyConfig(config, dead, dead, port=0, rest_port=0)).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(2):   # the second answers too: the proxy keeps serving
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(_predict_request(1), timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert re.fullmatch(rf"upstream TF Serving gRPC at {dead.target} is unreachable "
                                r"\([^\n]+\); is it running\?", error.value.details())
        channel.close()
        setup = {"rest": {"proxy": proxy.rest_port}}
        status, body, _ = _rest(setup, "proxy", "POST", "/v1/models/cnn:predict", b"{}")
        assert status == 502
        assert body["error"] == (f"upstream TF Serving REST at {dead.target} is unreachable "
                                 "(connection refused); is it running?")
        connection = http.client.HTTPConnection("127.0.0.1", proxy.rest_port, timeout=30)
        connection.request("GET", "/monitoring/prometheus/metrics")
        metrics = connection.getresponse().read().decode()
        connection.close()
        assert 'fer_serve_proxy_upstream_unreachable_total{protocol="grpc"} 2' in metrics
        assert 'fer_serve_proxy_upstream_unreachable_total{protocol="rest"} 1' in metrics
        assert proxy.request_log.counts() == {}   # failed requests are not logged
    finally:
        proxy.stop()


def test_fer_serve_cli_refuses_a_bad_upstream_in_one_line(tmp_path):
    config = _config(tmp_path / "models.config", str(tmp_path / "cnn"), None)
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "fer-serve"), "--model-config", config,
         "--upstream-grpc", "localhost", "--rest-port", "0"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "fer-serve: error: --upstream-grpc 'localhost': expected HOST:PORT, e.g. "
        "localhost:8500"]
