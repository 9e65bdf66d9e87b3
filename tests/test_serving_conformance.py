"""TF Serving protocol conformance, run against every server we can start here.

The same checks run against the embedded `fer-serve` and, when `tensorflow_model_server`
is on PATH, against the real TF Serving over the same serving root (skipped otherwise: it
has no pip or Debian package, see docs/serving.md). What is checked is what TF Serving's
api_rest.md and apis/*.proto promise, so a client that passes here works against both.
"""
from __future__ import annotations

import http.client
import json
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.core.net import free_port
from tests.serving_fixtures import (push_version, random_images, save_tiny_model,
                                    start_server_process)

SERVERS = [
    "embedded",
    pytest.param("tfserving", marks=pytest.mark.skipif(
        shutil.which("tensorflow_model_server") is None,
        reason="tensorflow_model_server is not on PATH (not installable here)")),
]


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    push_version(str(root / "cnn"), 1, save_tiny_model(str(root / "template"), bias_class=3))
    config = write_model_server_config(str(root / "models.config"),
                                       [ModelSpec("cnn", str(root / "cnn"))])
    grpc_port, rest_port = free_port(), free_port()
    process = start_server_process(config, grpc_port, rest_port, ["cnn"],
                                   "--server", request.param)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield {"rest_port": rest_port,
           "stub": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
    channel.close()
    process.terminate()
    process.wait(timeout=30)


def _rest(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server["rest_port"], timeout=30)
    connection.request(method, path, body=body)
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload


def test_model_status(server):
    status, body = _rest(server, "GET", "/v1/models/cnn")
    assert status == 200
    assert body["model_version_status"][0]["version"] == "1"
    assert body["model_version_status"][0]["state"] == "AVAILABLE"


def test_rest_row_and_columnar_predict_agree(server):
    images = random_images(3, seed=5).astype(int).tolist()
    status, rows = _rest(server, "POST", "/v1/models/cnn:predict",
                         json.dumps({"instances": images}).encode())
    assert status == 200, rows
    assert len(rows["predictions"]) == 3
    assert len(rows["predictions"][0]["probabilities"]) == 7
    status, columns = _rest(server, "POST", "/v1/models/cnn/versions/1:predict",
                            json.dumps({"inputs": {"pixels": images}}).encode())
    assert status == 200, columns
    np.testing.assert_allclose(columns["outputs"]["probabilities"],
                               [p["probabilities"] for p in rows["predictions"]], atol=1e-6)
    assert columns["outputs"]["class_name"] == [p["class_name"] for p in rows["predictions"]]


def test_grpc_predict_matches_rest_and_names_the_version(server):
    images = random_images(2, seed=6)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.model_spec.signature_name = "serving_default"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(images.astype(np.int32)))
    response = server["stub"].Predict(request, timeout=30)
    assert response.model_spec.version.value == 1
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    _, rows = _rest(server, "POST", "/v1/models/cnn:predict",
                    json.dumps({"instances": images.astype(int).tolist()}).encode())
    np.testing.assert_allclose(probabilities, [p["probabilities"] for p in rows["predictions"]],
                               atol=1e-6)


def test_grpc_metadata_lists_the_signatures(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "cnn"
    request.metadata_field.append("signature_def")
    response = server["stub"].GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "serving_uint8", "serving_examples"} <= set(
        signatures.signature_def)


def test_errors_are_4xx_with_a_message_and_the_server_keeps_serving(server):
    status, body = _rest(server, "GET", "/v1/models/nope")
    assert status == 404 and body["error"]
    status, body = _rest(server, "POST", "/v1/models/cnn:predict", b"{not json")
    assert status == 400 and body["error"]
    status, body = _rest(server, "POST", "/v1/models/cnn:predict",
                         json.dumps({"instances": [[1, 2, 3]]}).encode())
    assert status == 400 and body["error"]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as error:
        server["stub"].Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert _rest(server, "GET", "/v1/models/cnn")[0] == 200
