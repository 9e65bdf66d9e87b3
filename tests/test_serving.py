"""The embedded server against real SavedModels, over real gRPC and HTTP on 127.0.0.1."""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from fer_pipeline.core.contract import CLASS_NAMES
from fer_pipeline.core.serving_root import (ModelSpec, read_model_server_config,
                                  write_model_server_config)
from fer_pipeline.serving.model_manager import ModelManager
from fer_pipeline.serving.batching import Batcher, BatchingConfig
from fer_pipeline.serving.access import AccessConfig
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import (example_bytes, push_version, random_images,
                                    save_tiny_model, serve_in_subprocess)

MAX_REQUEST_BYTES = 1 << 20


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Two different tiny models: version A favours 'happy', version B favours 'sad'."""
    root = tmp_path_factory.mktemp("templates")
    return {"a": save_tiny_model(str(root / "a"), seed=0, bias_class=3),
            "b": save_tiny_model(str(root / "b"), seed=1, bias_class=4)}


@pytest.fixture(scope="module")
def serving_root(tmp_path_factory, templates):
    root = tmp_path_factory.mktemp("serving_models")
    push_version(str(root / "cnn"), 1, templates["a"])
    push_version(str(root / "cnn"), 2, templates["b"])
    config = write_model_server_config(str(root / "models.config"), [
        ModelSpec("cnn", str(root / "cnn"), "all", labels={"stable": 1, "canary": 2})])
    return config


def _start(config: str, **overrides) -> FerServer:
    return FerServer(ServerConfig(config, port=0, rest_port=0,
                                  max_request_bytes=MAX_REQUEST_BYTES, **overrides)).start()


@pytest.fixture(scope="module")
def server(serving_root):
    running = _start(serving_root)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def rest(server, method: str, path: str, body=None, raw: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    payload = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, payload


def grpc_predict(stub, images, model="cnn", signature="serving_uint8", version=None,
                 label="", dtype=np.uint8, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(np.asarray(images, dtype)))
    request.output_filter.extend(output_filter)
    response = stub.Predict(request, timeout=10)
    return response, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def in_process(template: str, images: np.ndarray) -> dict[str, np.ndarray]:
    model = tf.saved_model.load(template)
    outputs = model.signatures["serving_default"](pixels=tf.constant(images, tf.int32))
    return {key: value.numpy() for key, value in outputs.items()}


# --- agreement -------------------------------------------------------------------------

def test_rest_and_grpc_agree_with_the_saved_model(server, stub, templates):
    images = random_images(5, seed=1)
    expected = in_process(templates["b"], images)

    response, by_grpc = grpc_predict(stub, images)
    assert response.model_spec.version.value == 2  # newest version by default
    status, rows = rest(server, "POST", "/v1/models/cnn:predict",
                        {"instances": images.astype(int).tolist()})
    assert status == 200
    status, columns = rest(server, "POST", "/v1/models/cnn:predict",
                           {"signature_name": "serving_default",
                            "inputs": {"pixels": images.reshape(5, -1).astype(int).tolist()}})
    assert status == 200

    np.testing.assert_allclose(by_grpc["probabilities"], expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose([r["probabilities"] for r in rows["predictions"]],
                               expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(columns["outputs"]["probabilities"], expected["probabilities"],
                               atol=1e-6)
    names = [n.decode() for n in expected["class_name"]]
    assert [n.decode() for n in by_grpc["class_name"]] == names
    assert [r["class_name"] for r in rows["predictions"]] == names
    assert columns["outputs"]["class_id"] == expected["class_id"].tolist()


def test_examples_signature_over_rest_b64_and_grpc_classify(server, stub, templates):
    images = random_images(3, seed=2)
    expected = in_process(templates["b"], images)
    examples = [example_bytes(image) for image in images]

    status, payload = rest(server, "POST", "/v1/models/cnn:predict", {
        "signature_name": "serving_examples",
        "instances": [{"b64": base64.b64encode(e).decode()} for e in examples]})
    assert status == 200, payload
    np.testing.assert_allclose([r["probabilities"] for r in payload["predictions"]],
                               expected["probabilities"], atol=1e-6)

    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "cnn"
    for serialized in examples:
        request.input.example_list.examples.add().ParseFromString(serialized)
    result = stub.Classify(request, timeout=10).result
    for row, classification in enumerate(result.classifications):
        assert [c.label for c in classification.classes] == list(CLASS_NAMES)
        np.testing.assert_allclose([c.score for c in classification.classes],
                                   expected["probabilities"][row], atol=1e-6)


def test_output_filter_and_version_label(server, stub, templates):
    images = random_images(2, seed=3)
    response, outputs = grpc_predict(stub, images, label="stable", output_filter=["class_id"])
    assert list(outputs) == ["class_id"]
    assert response.model_spec.version.value == 1
    assert outputs["class_id"].tolist() == in_process(templates["a"], images)["class_id"].tolist()
    status, payload = rest(server, "POST", "/v1/models/cnn/labels/canary:predict",
                           {"instances": images.astype(int).tolist()})
    assert status == 200
    assert [r["class_id"] for r in payload["predictions"]] == \
        in_process(templates["b"], images)["class_id"].tolist()


def test_status_and_metadata(server, stub):
    status, payload = rest(server, "GET", "/v1/models/cnn")
    assert status == 200
    assert [(s["version"], s["state"]) for s in payload["model_version_status"]] == \
        [("1", "AVAILABLE"), ("2", "AVAILABLE")]
    status, payload = rest(server, "GET", "/v1/models/cnn/labels/stable")
    assert [s["version"] for s in payload["model_version_status"]] == ["1"]
    status, payload = rest(server, "GET", "/v1/models/cnn/versions/2/metadata")
    assert status == 200 and payload["model_spec"]["version"] == "2"
    signatures = payload["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "serving_uint8", "serving_examples"}
    assert signatures["serving_default"]["inputs"]["pixels"]["dtype"] == "DT_INT32"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}"
                                "/monitoring/prometheus/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "fer_serve_batching_enabled 0" in response.read().decode()

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "cnn"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=10)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    outputs = signature_map.signature_def["serving_uint8"].outputs
    assert set(outputs) == {"probabilities", "class_id", "class_name"}

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "cnn"
    answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request)
    assert [(s.version, s.state) for s in answer.model_version_status] == [(1, 30), (2, 30)]
    channel.close()


# --- bad requests ----------------------------------------------------------------------

GOOD = {"instances": [[[0] * 48] * 48]}

BAD_REST = [
    ("POST", "/v1/models/nope:predict", GOOD, 404, "nope"),
    ("POST", "/v1/models/cnn/versions/9:predict", GOOD, 404, "9"),
    ("POST", "/v1/models/cnn/labels/gold:predict", GOOD, 404, "gold"),
    ("GET", "/v2/whatever", None, 404, "Malformed"),
    ("POST", "/v1/models/cnn:predict", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/models/cnn:predict", {"instances": [[1, 2], [3]]}, 400, "ragged"),
    ("POST", "/v1/models/cnn:predict", {"instances": [[1.5] * 2304]}, 400, "non-integer"),
    ("POST", "/v1/models/cnn:predict", {"instances": [["a"] * 2304]}, 400, "numbers"),
    ("POST", "/v1/models/cnn:predict", {"instances": [[0] * 100]}, 400, "one 48x48 face"),
    ("POST", "/v1/models/cnn:predict", {"signature_name": "serving_uint8",
                                        "instances": [[300] * 2304]}, 400, "out of range"),
    ("POST", "/v1/models/cnn:predict", {"signature_name": "nope", **GOOD}, 400, "nope"),
    ("POST", "/v1/models/cnn:predict", {"inputs": {"image": [[0] * 2304]}}, 400, "image"),
    ("POST", "/v1/models/cnn:predict", {"foo": 1}, 400, "instances"),
    ("POST", "/v1/models/cnn:predict", {"instances": []}, 400, "non-empty"),
    ("POST", "/v1/models/cnn:predict", [1, 2], 400, "JSON object"),
    ("POST", "/v1/models/cnn:regress", GOOD, 400, "regress"),
    ("GET", "/v1/models/cnn:predict", None, 405, "POST"),
    ("POST", "/v1/models/cnn/metadata", GOOD, 405, "GET"),
    ("PUT", "/v1/models/cnn", GOOD, 405, "not allowed"),
]


@pytest.mark.parametrize("method,path,body,code,fragment", BAD_REST,
                         ids=[f"{c}-{p}-{i}" for i, (_, p, _, c, _) in enumerate(BAD_REST)])
def test_bad_rest_requests_get_their_status(server, method, path, body, code, fragment):
    raw = body if isinstance(body, bytes) else None
    status, payload = rest(server, method, path, body=None if raw else body, raw=raw)
    assert status == code, payload
    assert fragment in payload["error"]
    assert rest(server, "POST", "/v1/models/cnn:predict", GOOD)[0] == 200  # still serving


def test_oversized_rest_request_is_413(server):
    raw = b" " * (MAX_REQUEST_BYTES + 1)
    status, payload = rest(server, "POST", "/v1/models/cnn:predict", raw=raw)
    assert status == 413 and "exceeds" in payload["error"]
    assert rest(server, "POST", "/v1/models/cnn:predict", GOOD)[0] == 200


@pytest.mark.parametrize("kwargs,code,fragment", [
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
    ({"version": 9}, grpc.StatusCode.NOT_FOUND, "9"),
    ({"label": "gold"}, grpc.StatusCode.NOT_FOUND, "gold"),
    ({"signature": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "nope"),
    ({"dtype": np.float32}, grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ({"images": np.zeros((2, 47, 47))}, grpc.StatusCode.INVALID_ARGUMENT, "one 48x48 face"),
    ({"output_filter": ["logits"]}, grpc.StatusCode.INVALID_ARGUMENT, "logits"),
    ({"images": np.zeros((300, 48, 48))}, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_grpc_requests_get_their_code(stub, kwargs, code, fragment):
    kwargs = dict(kwargs)  # the parametrize dict is shared: a re-run must see it unchanged
    images = kwargs.pop("images", np.zeros((2, 48, 48)))
    if "dtype" not in kwargs and images.shape[0] == 300:
        kwargs["dtype"] = np.int32  # 300 x 2304 x 4 bytes is over the 1 MiB limit
    with pytest.raises(grpc.RpcError) as raised:
        grpc_predict(stub, images, **kwargs)
    assert raised.value.code() == code
    assert fragment in raised.value.details()
    assert grpc_predict(stub, np.zeros((1, 48, 48)))[0].model_spec.version.value == 2


def test_missing_input_is_invalid_argument(stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 2304), np.int32)))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in raised.value.details()


# --- version policy, labels, hidden directories ------------------------------------------

def test_version_policies_and_directory_rules(tmp_path, templates):
    base = tmp_path / "cnn"
    for version in (1, 2, 3):
        push_version(str(base), version, templates["a"])
    shutil.copytree(templates["a"], base / ".4.partial")   # hidden: still being pushed
    shutil.copytree(templates["a"], base / "latest")       # not an integer
    (base / "5").mkdir()                                   # broken: no saved_model.pb
    config = str(tmp_path / "models.config")

    def served(spec: ModelSpec) -> list[int]:
        write_model_server_config(config, [spec])
        manager = ModelManager(config)
        manager.sync()
        return [s.version for s in manager.status("cnn") if s.state == "AVAILABLE"]

    assert served(ModelSpec("cnn", str(base), "latest", num_latest=2)) == [3]  # 5 is broken
    assert served(ModelSpec("cnn", str(base), "specific", versions=[1, 3])) == [1, 3]
    assert served(ModelSpec("cnn", str(base), "all")) == [1, 2, 3]

    manager = ModelManager(config)
    manager.sync()
    broken = manager.status("cnn", version=5)[0]
    assert broken.state == "END" and broken.error_message
    shutil.rmtree(base / "2")
    manager.sync()
    assert manager.status("cnn", version=2)[0].state == "END"
    assert manager.resolve("cnn").version == 3


# --- hot swap under load -----------------------------------------------------------------

CLIENTS, REQUESTS_PER_CLIENT, LOAD_DEADLINE_S = 16, 500, 60


@pytest.mark.parametrize("server_flags", [
    [], ["--batching", "--max-batch-size", "16", "--batch-timeout-ms", "2"]],
    ids=["unbatched", "batching"])
def test_new_version_under_load_loses_no_request(tmp_path, templates, server_flags):
    """With batching too: the new version gets its own batch queue while the old one
    drains, so no request is lost or answered by a half-swapped model."""
    base = tmp_path / "cnn"
    push_version(str(base), 1, templates["a"])
    config = write_model_server_config(str(tmp_path / "models.config"),
                                       [ModelSpec("cnn", str(base))])
    log = open(tmp_path / "server.log", "w+")
    process, grpc_port, _ = serve_in_subprocess(config, log, "--poll-seconds", "0.2",
                                                *server_flags)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images = random_images(1, seed=4)
    versions_seen: list[list[int]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client(index: int) -> None:
        for _ in range(REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                failures.append("deadline")
                return
            try:
                response, _ = grpc_predict(stub, images, output_filter=["class_id"])
                versions_seen[index].append(response.model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(f"{error.code()}: {error.details()}")

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        while sum(map(len, versions_seen)) < CLIENTS * REQUESTS_PER_CLIENT // 4:
            time.sleep(0.01)
        push_version(str(base), 2, templates["b"])  # policy latest 1: 2 replaces 1
        for thread in threads:
            thread.join()
    finally:
        channel.close()
        process.terminate()
        process.wait(timeout=20)
        log.close()
    assert failures == []
    assert sum(map(len, versions_seen)) == CLIENTS * REQUESTS_PER_CLIENT
    assert all(seen[0] == 1 for seen in versions_seen if seen)
    assert {seen[-1] for seen in versions_seen} == {2}
    # Once a client saw version 2 it never went back to 1.
    assert all(seen == sorted(seen) for seen in versions_seen)


# --- batching ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["timeout", "fill"])
def test_batching_gives_identical_results(serving_root, templates, policy):
    batching = _start(serving_root, batching=True,
                      batching_config=BatchingConfig(max_batch_size=8, batch_timeout_s=0.02,
                                                     policy=policy))
    try:
        images = random_images(32, seed=5)
        expected = in_process(templates["b"], images)
        results: dict[int, dict] = {}
        channel = grpc.insecure_channel(f"127.0.0.1:{batching.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def one(index: int) -> None:
            results[index] = grpc_predict(stub, images[index:index + 1])[1]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        channel.close()
        got = np.concatenate([results[i]["probabilities"] for i in range(len(images))])
        np.testing.assert_allclose(got, expected["probabilities"], atol=1e-6)
        assert [int(results[i]["class_id"][0]) for i in range(len(images))] == \
            expected["class_id"].tolist()
        # The 32 concurrent requests really were merged (max 8 rows per model call); with
        # fill, how many merged depends on how fast they came, so only the bound is certain.
        batcher = batching.predictor.batcher
        assert batcher.stats.requests == 32 and 4 <= batcher.stats.batches
        if policy == "timeout":
            assert batcher.stats.batches < 32
        # The same counters, as Prometheus text on TF Serving's metrics path.
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{batching.rest_port}/monitoring/prometheus/metrics").read().decode()
        assert "fer_serve_batching_enabled 1" in metrics
        assert 'fer_serve_batching_requests_total{model_name="cnn"} 32' in metrics
        assert f'fer_serve_batching_batches_total{{model_name="cnn"}} {batcher.stats.batches}' \
            in metrics
        assert 'fer_serve_batching_rows_total{model_name="cnn"} 32' in metrics
        # A bad request inside a batching server fails alone and the server keeps going.
        status, _ = rest(batching, "POST", "/v1/models/cnn:predict", {"instances": [[0] * 7]})
        assert status == 400
        status, payload = rest(batching, "POST", "/v1/models/cnn:predict",
                               {"instances": images[:2].astype(int).tolist()})
        assert status == 200
        np.testing.assert_allclose([r["probabilities"] for r in payload["predictions"]],
                                   expected["probabilities"][:2], atol=1e-6)
    finally:
        batching.stop()


def test_batcher_fills_one_batch_at_a_time():
    """Free executors do not split the waiting requests between them: one collector forms
    a batch until it is full (or timed out), so 8 requests arriving within the timeout make
    one full model call even with 4 executors idle."""

    calls = []

    class RecordingModel:
        name = "recording"

        def run(self, signature, inputs):
            calls.append(len(inputs["x"]))
            return {"y": inputs["x"] + 1}

    batcher = Batcher(BatchingConfig(max_batch_size=8, batch_timeout_s=5.0,
                                     num_batch_threads=4))
    model, results = RecordingModel(), {}

    def call(i):
        time.sleep(0.005 * i)  # staggered arrivals, all well within the timeout
        results[i] = int(batcher.run(model, "sig", {"x": np.array([[i]])})["y"][0][0])

    started = time.monotonic()
    callers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert results == {i: i + 1 for i in range(8)}
    assert calls == [8]
    assert time.monotonic() - started < 4.0  # a full batch does not wait for the timeout
    assert (batcher.stats.requests, batcher.stats.batches, batcher.stats.rows) == (8, 1, 8)
    assert batcher.snapshot()["recording"].mean_batch_rows == 8.0


def test_fill_policy_runs_a_lone_request_at_once_and_fills_behind_a_running_batch():
    """--batch-policy fill: no timeout. The first request runs alone at once (an hour's
    timeout is not waited); the ones arriving while it runs wait for it, although a second
    executor is free, and then run as one batch."""

    class SlowModel:
        name = "slow"

        def __init__(self):
            self.rows_seen = []

        def run(self, signature, inputs):
            self.rows_seen.append(len(inputs["x"]))
            time.sleep(0.5)
            return {"y": inputs["x"] * 2}

    model = SlowModel()
    batcher = Batcher(BatchingConfig(max_batch_size=8, batch_timeout_s=3600.0,
                                     num_batch_threads=2, policy="fill"))
    results = {}

    def call(i):
        results[i] = int(batcher.run(model, "sig", {"x": np.array([[i]])})["y"][0][0])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    while not model.rows_seen:   # the lone request is running
        time.sleep(0.005)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 6)]
    for caller in others:
        caller.start()
    for caller in [first, *others]:
        caller.join()
    assert results == {i: 2 * i for i in range(6)}
    assert model.rows_seen == [1, 5]
    assert batcher.stats.mean_batch_rows == 3.0


def test_eager_tensor_equals_tf_constant_on_any_buffer():
    """serving/tensors.eager_tensor (DLPack, no leak) makes what tf.constant makes, from an
    unaligned or strided buffer, with a cast, and for strings and empty arrays."""
    import tensorflow as tf

    from fer_pipeline.serving.tensors import eager_tensor

    unaligned = np.zeros(2 * 5 * 4 + 4, np.uint8)[4:].view(np.int32).reshape(2, 5)
    unaligned[...] = np.arange(10).reshape(2, 5)
    cases = [(unaligned, tf.int32), (np.arange(12).reshape(3, 4)[:, ::2], tf.float32),
             (np.array([b"a", b"bc"]), tf.string), (np.zeros((0, 3), np.float32), tf.float32)]
    for array, dtype in cases:
        made, wanted = eager_tensor(array, dtype), tf.constant(array, dtype=dtype)
        assert (made.dtype, made.shape) == (wanted.dtype, wanted.shape)
        assert np.array_equal(made.numpy(), wanted.numpy())
        assert np.array_equal((made + made).numpy() if dtype != tf.string else made.numpy(),
                              (wanted + wanted).numpy() if dtype != tf.string
                              else wanted.numpy())   # an op can use it


def test_eager_tensor_leaves_no_memory_behind():
    """tf.constant leaks ~340 bytes a call on TF 2.16 / Python 3.11 (serving/tensors.py);
    the server's input tensors must not: a soaked server would grow without end."""
    import gc
    import tracemalloc

    import tensorflow as tf

    from fer_pipeline.serving.tensors import eager_tensor

    face = np.arange(48 * 48, dtype=np.int32).reshape(1, 48, 48)
    for _ in range(50):
        eager_tensor(face, tf.int32)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(2000):
            eager_tensor(face, tf.int32)
        gc.collect()
        grown = sum(stat.size_diff for stat in
                    tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes left after 2,000 tensors (tf.constant: ~680,000)"


def test_batcher_runs_batches_on_several_threads_at_once():
    """With num_batch_threads=2 a batch is collected while another one runs."""

    class SlowModel:  # stands in for a loaded version: the batcher uses .name and .run
        name = "slow"

        def __init__(self):
            self.lock, self.running, self.most_at_once, self.rows_seen = \
                threading.Lock(), 0, 0, []

        def run(self, signature, inputs):
            with self.lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
                self.rows_seen.append(len(inputs["x"]))
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
            return {"y": inputs["x"] * 2}

    for threads, expected_overlap in ((1, 1), (2, 2)):
        model = SlowModel()
        batcher = Batcher(BatchingConfig(max_batch_size=4, batch_timeout_s=0.001,
                                         num_batch_threads=threads))
        results = {}

        def call(i):
            results[i] = batcher.run(model, "sig", {"x": np.array([[i]])})["y"]

        callers = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert {i: int(r[0][0]) for i, r in results.items()} == {i: 2 * i for i in range(16)}
        assert model.most_at_once == expected_overlap
        assert sum(model.rows_seen) == 16 and max(model.rows_seen) <= 4


def test_tf_thread_pool_flags_reach_tensorflow():
    """--tensorflow-{intra,inter}-op-parallelism set TF's pools (in a fresh process: they
    can only be set before TF first runs)."""
    code = ("from fer_pipeline.serving.server import parse_args, _set_tf_threads\n"
            "args = parse_args(['--model-config', 'unused', '--tensorflow-intra-op-parallelism',"
            " '1', '--tensorflow-inter-op-parallelism', '3'])\n"
            "_set_tf_threads(args.tensorflow_intra_op_parallelism,"
            " args.tensorflow_inter_op_parallelism)\n"
            "import tensorflow as tf\n"
            "tf.constant(1) + 1\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(),"
            " tf.config.threading.get_inter_op_parallelism_threads())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["1", "3"]


def test_full_batch_queue_refuses_with_unavailable_and_recovers():
    """Past max_enqueued_batches full batches of waiting rows, requests are refused at once
    (UNAVAILABLE, REST 503) instead of queueing without bound; the rest are answered."""
    from fer_pipeline.serving.model_manager import ServingError

    class SlowModel:
        name = "slow"

        def run(self, signature, inputs):
            time.sleep(0.2)
            return {"y": inputs["x"] * 2}

    batcher = Batcher(BatchingConfig(max_batch_size=2, batch_timeout_s=0.001,
                                     num_batch_threads=1, max_enqueued_batches=1))
    model, answers, refusals = SlowModel(), {}, []

    def call(i):
        try:
            answers[i] = int(batcher.run(model, "sig", {"x": np.array([[i]])})["y"][0][0])
        except ServingError as error:
            refusals.append((error.code, error.message))

    callers = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for caller in callers:
        caller.start()
        time.sleep(0.005)  # the first batch is running before most of the others arrive
    for caller in callers:
        caller.join()
    assert refusals and len(refusals) + len(answers) == 12
    assert {code for code, _ in refusals} == {"UNAVAILABLE"}
    assert "queue" in refusals[0][1]
    assert answers == {i: 2 * i for i in answers}
    assert batcher.stats.refused == len(refusals) == batcher.snapshot()["slow"].refused
    assert batcher.run(model, "sig", {"x": np.array([[21]])})["y"][0][0] == 42


def test_batching_parameters_file_configures_both_servers(tmp_path):
    from fer_pipeline.serving.batching import format_batching_parameters, read_batching_parameters
    from fer_pipeline.serving.server import parse_args, tfserving_command

    wanted = BatchingConfig(max_batch_size=16, batch_timeout_s=0.005, num_batch_threads=3,
                            max_enqueued_batches=7)
    path = tmp_path / "batching.pbtxt"
    path.write_text("# TF Serving BatchingParameters\n" + format_batching_parameters(wanted))
    assert read_batching_parameters(str(path)) == wanted

    args = parse_args(["--model-config", "models.config",
                       "--batching-parameters-file", str(path)])
    assert args.batching and args.batching_config == wanted  # the file implies batching
    command = tfserving_command("tensorflow_model_server", args)
    assert "--enable_batching=true" in command
    assert f"--batching_parameters_file={path}" in command

    # Flags instead of a file: the real server gets a file written from them.
    args = parse_args(["--model-config", "models.config", "--batching",
                       "--max-batch-size", "8", "--batch-timeout-ms", "3"])
    written = [c for c in tfserving_command("tensorflow_model_server", args)
               if c.startswith("--batching_parameters_file=")][0].split("=", 1)[1]
    try:
        got = read_batching_parameters(written)
    finally:
        os.remove(written)
    assert (got.max_batch_size, got.batch_timeout_s) == (8, 0.003)
    assert got == args.batching_config

    # What the embedded server cannot honour is an error, and so is giving settings twice.
    unsupported = tmp_path / "unsupported.pbtxt"
    unsupported.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n")
    with pytest.raises(ValueError, match="not supported"):
        read_batching_parameters(str(unsupported))
    with pytest.raises(SystemExit):
        parse_args(["--model-config", "m", "--batching-parameters-file", str(path),
                    "--max-batch-size", "4"])


def test_reload_config_request_changes_what_is_served(tmp_path, serving_root):
    """ModelService.HandleReloadConfigRequest: the new config is served when the call
    returns (models left out unloaded), a bad config is refused without harm, and the
    models.config file wins again once it changes."""
    base = read_model_server_config(serving_root)[0].base_path
    config = write_model_server_config(str(tmp_path / "models.config"),
                                       [ModelSpec("cnn", base, "all")])
    # The served base path lives outside models.config's directory: allowed explicitly
    # (tests/test_serving_access.py checks the refusals).
    running = _start(config, poll_seconds=0.2, access=AccessConfig(
        allowed_roots=(str(tmp_path), os.path.dirname(base))))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def available(name):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        try:
            answer = models.GetModelStatus(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return None
        return sorted(s.version for s in answer.model_version_status
                      if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE)

    try:
        assert available("cnn") == [1, 2]
        request = model_management_pb2.ReloadConfigRequest()
        cnn = request.config.model_config_list.config.add(name="cnn", base_path=base)
        cnn.model_version_policy.specific.versions.append(1)
        request.config.model_config_list.config.add(name="cnn_latest", base_path=base)
        response = models.HandleReloadConfigRequest(request, timeout=60)
        assert response.status.error_code == 0
        assert available("cnn") == [1] and available("cnn_latest") == [2]
        response, _ = grpc_predict(predictions, random_images(1), model="cnn_latest")
        assert response.model_spec.version.value == 2

        duplicate = model_management_pb2.ReloadConfigRequest()
        duplicate.config.model_config_list.config.add(name="x", base_path=base)
        duplicate.config.model_config_list.config.add(name="x", base_path=base)
        custom = model_management_pb2.ReloadConfigRequest()
        custom.config.custom_model_config.type_url = "type.googleapis.com/some.Config"
        for bad, fragment in ((duplicate, "more than once"), (custom, "custom_model_config")):
            with pytest.raises(grpc.RpcError) as refused:
                models.HandleReloadConfigRequest(bad, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in refused.value.details()
        assert available("cnn") == [1] and available("cnn_latest") == [2]

        broken = tmp_path / "broken"
        (broken / "1").mkdir(parents=True)
        (broken / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
        request.config.model_config_list.config.add(name="broken", base_path=str(broken))
        with pytest.raises(grpc.RpcError) as failed:
            models.HandleReloadConfigRequest(request, timeout=60)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert "broken version 1" in failed.value.details()
        assert available("cnn_latest") == [2] and available("broken") == []

        time.sleep(0.05)  # a new mtime: the file is read again and wins
        write_model_server_config(config, [ModelSpec("cnn", base, "all")])
        deadline = time.monotonic() + 20
        while available("cnn_latest") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert available("cnn_latest") is None and available("broken") is None
        assert available("cnn") == [1, 2]
    finally:
        channel.close()
        running.stop()
