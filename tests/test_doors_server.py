"""The server door: every request is checked against the signature (and the faces contract)
before TensorFlow sees it and answered in TF Serving's error format; a model with nothing
to serve is reported by name and path, not as an empty 200; a busy port is named.

Table-driven over real gRPC and HTTP on 127.0.0.1, with the tiny contract models of
tests/serving_fixtures.py (no training).
"""
from __future__ import annotations

import http.client
import json
import socket

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from fer_pipeline.serving import server as fer_serve
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import push_version, save_tiny_model

FACE = [[0] * 48] * 48


@pytest.fixture(scope="module")
def serving_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("doors_serving")
    template = save_tiny_model(str(root / "template"))
    push_version(str(root / "cnn"), 1, template)
    push_version(str(root / "pinned"), 1, template)
    (root / "empty").mkdir()
    config = write_model_server_config(str(root / "models.config"), [
        ModelSpec("cnn", str(root / "cnn")),
        ModelSpec("empty", str(root / "empty")),
        ModelSpec("gone", str(root / "no_such_dir")),
        ModelSpec("pinned", str(root / "pinned"), "specific", versions=[5]),
    ])
    return {"root": root, "config": config}


@pytest.fixture(scope="module")
def server(serving_root):
    running = FerServer(ServerConfig(serving_root["config"], port=0, rest_port=0)).start()
    yield running
    running.stop()


def rest(server, method: str, path: str, body=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    connection.request(method, path, body=json.dumps(body).encode() if body is not None
                       else None)
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload


# (body for POST /v1/models/cnn:predict, HTTP status, words of {"error": ...})
BAD_BODIES = [
    ({"instances": [[0] * 4608]}, 400, ["each instance must be one 48x48 face", "[4608]"]),
    ({"instances": [[0] * 2305]}, 400, ["one 48x48 face", "[2305]"]),
    ({"instances": [[0] * 100]}, 400, ["[n, 48, 48] or [n, 2304]"]),
    ({"instances": [[[0] * 47] * 48]}, 400, ["one 48x48 face", "[48, 47]"]),
    ({"instances": [[FACE, FACE]]}, 400, ["one 48x48 face", "[2, 48, 48]"]),
    ({"instances": [0, 1, 2]}, 400, ["one 48x48 face", "[3]"]),
    ({"instances": [[300] * 2304]}, 400, ["pixel values must be 0-255", "300"]),
    ({"instances": [[-1] * 2304]}, 400, ["pixel values must be 0-255", "-1"]),
    ({"inputs": {"pixels": [[0] * 4608]}}, 400, ["one 48x48 face"]),
    ({"inputs": [[7] * 4608]}, 400, ["one 48x48 face"]),
    ({"signature_name": "serving_uint8", "instances": [[0] * 4608]}, 400, ["one 48x48 face"]),
    ({"signature_name": "serving_examples", "instances": [[0] * 3]}, 400,
     ["examples", "expects strings"]),
]


@pytest.mark.parametrize("body, status, words", BAD_BODIES,
                         ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_a_bad_predict_body_is_a_400_in_tf_servings_format(server, body, status, words):
    got, payload = rest(server, "POST", "/v1/models/cnn:predict", body)
    assert got == status, payload
    assert set(payload) == {"error"}
    message = payload["error"]
    assert "Traceback" not in message and "\n" not in message
    assert "Condition x" not in message and "reshape" not in message  # TF's own texts
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("body, count", [
    ({"instances": [FACE, FACE]}, 2),
    ({"instances": [[0] * 2304]}, 1),
    ({"instances": [[255] * 2304] * 3}, 3),
    ({"inputs": [[0] * 2304, [1] * 2304]}, 2),
])
def test_one_prediction_per_instance(server, body, count):
    status, payload = rest(server, "POST", "/v1/models/cnn:predict", body)
    assert status == 200, payload
    rows = payload.get("predictions") or payload["outputs"]["probabilities"]
    assert len(rows) == count


def _grpc_predict(server, array: np.ndarray, signature: str = "serving_default"):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.model_spec.signature_name = signature
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(array))
    try:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=30)
    finally:
        channel.close()


@pytest.mark.parametrize("array, words", [
    (np.zeros((1, 4608), np.int32), ["one 48x48 face", "[1, 4608]"]),
    (np.zeros((2304,), np.int32), ["one 48x48 face", "[2304]"]),
    (np.zeros((48, 48), np.int32), ["one 48x48 face", "[48, 48]"]),
    (np.full((1, 2304), 256, np.int32), ["0-255", "256"]),
    (np.zeros((1, 2304), np.float32), ["dtype float32", "int32"]),
], ids=["two-faces-in-one", "no-batch", "one-face-no-batch", "out-of-range", "dtype"])
def test_a_bad_grpc_tensor_is_invalid_argument(server, array, words):
    with pytest.raises(grpc.RpcError) as raised:
        _grpc_predict(server, array)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in raised.value.details(), (word, raised.value.details())
    good = _grpc_predict(server, np.zeros((3, 48, 48), np.uint8), "serving_uint8")
    assert tf.make_ndarray(good.outputs["probabilities"]).shape == (3, 7)


# --- models with nothing to serve -------------------------------------------------------

# (model, words of the 404: its name, path and why)
UNSERVABLE = [
    ("empty", ["Could not find any versions of model empty", "empty", "holds no version"]),
    ("gone", ["model gone", "no_such_dir", "does not exist"]),
    ("pinned", ["model pinned", "'specific' wants version(s) [5]", "holds [1]"]),
]


@pytest.mark.parametrize("model, words", UNSERVABLE, ids=[m for m, _ in UNSERVABLE])
def test_a_model_with_no_version_is_reported_by_name_and_path(server, model, words):
    status, payload = rest(server, "GET", f"/v1/models/{model}")
    assert status == 404, payload
    for word in words:
        assert word in payload["error"], (word, payload)
    status, payload = rest(server, "POST", f"/v1/models/{model}:predict",
                           {"instances": [FACE]})
    assert status == 404 and words[-1] in payload["error"]
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    with pytest.raises(grpc.RpcError) as raised:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
    channel.close()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert words[-1] in raised.value.details()
    assert model in server.manager.unservable()      # what fer-serve warns about at start
    assert "cnn" not in server.manager.unservable()


# --- starting ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["port", "rest_port"])
def test_a_busy_port_is_named(serving_root, which):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"port": 0, "rest_port": 0, which: port}
        with pytest.raises(OSError) as raised:
            FerServer(ServerConfig(serving_root["config"], **ports)).start()
    message = str(raised.value)
    protocol, flag = ("gRPC", "--port") if which == "port" else ("REST", "--rest-port")
    assert f"cannot listen for {protocol} on 127.0.0.1:{port}" in message
    assert "already in use" in message and flag in message
    assert "Errno" not in message


def test_a_missing_model_config_is_one_line(tmp_path, capsys):
    status = fer_serve.main(["--model-config", str(tmp_path / "models.config"),
                             "--server", "embedded"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "--model-config" in err and "no such file" in err
