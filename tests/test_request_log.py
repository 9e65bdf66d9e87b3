"""Request logs in fer-serve (serving/request_log.py): what is logged over gRPC and REST,
sampling, rotation, a full queue, 16 clients at sampling rate 1.0, and a killed server.

Tiny contract models (tests/serving_fixtures.py), real servers on 127.0.0.1, real files.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)

from fer_pipeline.core.serving_root import (ModelSpec, RequestLogSpec, read_model_server_config,
                                  write_model_server_config)
from fer_pipeline.serving.request_log import (LOG_SUFFIX, OPEN_SUFFIX, RequestLogConfig, RequestLogger,
                                 log_files, read_logs)
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import (example_bytes, push_version, random_images,
                                    save_tiny_model, serve_in_subprocess)

METRICS_PATH = "/monitoring/prometheus/metrics"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("template") / "model"), bias_class=3)


def serving_root(root, template: str, sampling_rate: float = 1.0) -> tuple[str, str]:
    """cnn (logged to root/logs/cnn/requests-*) and vgg16 (no logging_config), version 1
    each; returns (models.config, log directory)."""
    logs = os.path.join(root, "logs")
    for name in ("cnn", "vgg16"):
        push_version(os.path.join(root, name), 1, template)
    config = write_model_server_config(os.path.join(root, "models.config"), [
        ModelSpec("cnn", os.path.join(root, "cnn"),
                  request_log=RequestLogSpec(os.path.join(logs, "cnn", "requests"),
                                             sampling_rate)),
        ModelSpec("vgg16", os.path.join(root, "vgg16"))])
    return config, logs


def tagged_image(client: int, request: int) -> np.ndarray:
    """A face whose first three pixels say who sent it, so logs can be matched to sends."""
    image = random_images(1, seed=client)[0]
    image[0, :3] = (client, request // 256, request % 256)
    return image


def tag_of(pixels: np.ndarray) -> tuple[int, int]:
    first = np.asarray(pixels).reshape(-1)[:3].astype(int)
    return int(first[0]), int(first[1]) * 256 + int(first[2])


def predict_request(image: np.ndarray, model: str = "cnn") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_uint8"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(image[None].astype(np.uint8)))
    return request


def rest_predict(connection: http.client.HTTPConnection, image: np.ndarray,
                 model: str = "cnn") -> tuple[int, dict]:
    body = json.dumps({"signature_name": "serving_uint8",
                       "instances": image[None].astype(int).tolist()})
    connection.request("POST", f"/v1/models/{model}:predict", body=body)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def metrics(rest_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{METRICS_PATH}",
                                  timeout=10).read().decode()
    return {key: float(value) for key, value in
            re.findall(r"^(fer_serve_request_log_\S+)\s+(\S+)$", text, re.M)}


def logged_tags(records: list[prediction_log_pb2.PredictionLog]) -> list[tuple[int, int]]:
    return [tag_of(tf.make_ndarray(r.predict_log.request.inputs["pixels"])) for r in records]


# --- what a record holds ---------------------------------------------------------------------

def test_grpc_and_rest_requests_are_logged_as_prediction_logs(tmp_path, template):
    config, logs = serving_root(tmp_path, template)
    server = FerServer(ServerConfig(config, port=0, rest_port=0)).start()
    started = int(time.time())
    images = [tagged_image(1, i) for i in range(3)]
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        grpc_request = predict_request(images[0])
        grpc_response = stub.Predict(grpc_request, timeout=10,
                                     metadata=(("x-request-id", "client-7"),))
        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name = "cnn"
        example = classify.input.example_list.examples.add()
        example.ParseFromString(example_bytes(images[1]))
        classify_response = stub.Classify(classify, timeout=10)
        stub.Predict(predict_request(images[0], model="vgg16"), timeout=10)  # not logged
        with pytest.raises(grpc.RpcError):  # a failed request is not logged either
            bad = predict_request(images[0])
            bad.model_spec.signature_name = "no_such_signature"
            stub.Predict(bad, timeout=10)
        channel.close()
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
        connection.putrequest("POST", "/v1/models/cnn:predict")
        body = json.dumps({"signature_name": "serving_uint8",
                           "instances": images[2][None].astype(int).tolist()}).encode()
        connection.putheader("X-Request-Id", "rest-9")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        status, rest_answer = response.status, json.loads(response.read())
        assert status == 200
        connection.close()
        deadline = time.monotonic() + 10
        while metrics(server.rest_port).get(
                'fer_serve_request_log_written_total{model_name="cnn"}') != 3:
            assert time.monotonic() < deadline, metrics(server.rest_port)
            time.sleep(0.05)
        assert server.request_log.counts()["cnn"].dropped == 0
    finally:
        server.stop()
    finished = int(time.time())

    files = log_files(logs)
    assert files and all(f.endswith(LOG_SUFFIX) for f in files)   # stop() closed them all
    assert all(os.path.basename(f).startswith("requests-") for f in files)
    # The files are plain TFRecords of PredictionLogs, read without our reader.
    records = [prediction_log_pb2.PredictionLog.FromString(raw.numpy())
               for raw in tf.data.TFRecordDataset(files)]
    assert records == list(read_logs(logs))
    assert [r.WhichOneof("log_type") for r in records] == ["predict_log", "classify_log",
                                                          "predict_log"]
    for record in records:
        metadata = record.log_metadata
        assert (metadata.model_spec.name, metadata.model_spec.version.value) == ("cnn", 1)
        assert metadata.sampling_config.sampling_rate == 1.0
        assert started <= metadata.timestamp_secs <= finished

    by_grpc, by_classify, by_rest = records
    # The request id: the client's (gRPC metadata, HTTP header), else one the server made.
    assert by_grpc.log_metadata.request_origin == "client-7"
    assert by_rest.log_metadata.request_origin == "rest-9"
    assert re.fullmatch(r"[0-9a-f]{32}", by_classify.log_metadata.request_origin)
    assert by_grpc.predict_log.request == grpc_request
    assert by_grpc.predict_log.response == grpc_response
    assert by_grpc.log_metadata.model_spec.signature_name == "serving_uint8"
    assert by_classify.classify_log.request == classify
    assert by_classify.classify_log.response == classify_response
    # REST: the PredictRequest/PredictResponse TF Serving would have made of the JSON.
    rest_log = by_rest.predict_log
    assert rest_log.request.model_spec.signature_name == "serving_uint8"
    assert rest_log.response.model_spec.version.value == 1
    np.testing.assert_array_equal(tf.make_ndarray(rest_log.request.inputs["pixels"]),
                                  images[2][None])
    np.testing.assert_allclose(tf.make_ndarray(rest_log.response.outputs["probabilities"]),
                               [rest_answer["predictions"][0]["probabilities"]], atol=1e-6)


def test_the_ensemble_client_sends_one_request_id_to_every_model(tmp_path, template):
    """classify() asks each model with the same id, over gRPC and REST: the logs tie the
    models' answers to one request (the monitor joins them by it), each call its own."""
    from fer_pipeline.serving.client import FerClient, classify

    logs = tmp_path / "logs"
    specs = []
    for name in ("cnn", "vgg16"):
        push_version(str(tmp_path / name), 1, template)
        specs.append(ModelSpec(name, str(tmp_path / name), request_log=RequestLogSpec(
            str(logs / name / "requests"), 1.0)))
    config = write_model_server_config(str(tmp_path / "models.config"), specs)
    server = FerServer(ServerConfig(config, port=0, rest_port=0)).start()
    try:
        for protocol in ("grpc", "rest"):
            client = FerClient(grpc_port=server.grpc_port, rest_port=server.rest_port,
                               protocol=protocol)
            classify(client, random_images(2, seed=3), ["cnn", "vgg16"], 0.05)
    finally:
        server.stop()
    ids = {name: [r.log_metadata.request_origin for r in read_logs(str(logs / name))]
           for name in ("cnn", "vgg16")}
    assert ids["cnn"] == ids["vgg16"] and len(set(ids["cnn"])) == 2


# --- config, sampling, rotation, a full queue ------------------------------------------------

def test_logging_config_round_trips_and_bad_values_are_one_line_errors(tmp_path):
    path = str(tmp_path / "models.config")
    spec = ModelSpec("cnn", "/srv/cnn", request_log=RequestLogSpec("/logs/cnn/requests", 0.25))
    write_model_server_config(path, [spec])
    assert read_model_server_config(path) == [spec]
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        RequestLogSpec("/logs/cnn/requests", 1.5)
    text = open(path).read()
    (tmp_path / "bad.config").write_text(text.replace('"tfrecord"', '"kafka"'))
    with pytest.raises(ValueError, match="type 'kafka' is not supported"):
        read_model_server_config(str(tmp_path / "bad.config"))
    (tmp_path / "bad.config").write_text(re.sub(r'filename_prefix: "[^"]*"', "", text))
    with pytest.raises(ValueError, match="needs log_collector_config.filename_prefix"):
        read_model_server_config(str(tmp_path / "bad.config"))


def log_arrays(logger: RequestLogger, count: int, name: str = "cnn") -> None:
    for index in range(count):
        logger.log_arrays(name, 1, "serving_uint8",
                          {"pixels": tagged_image(0, index)[None]},
                          {"class_id": np.array([index % 7])})


def test_sampling_rate_logs_that_share_of_requests(tmp_path):
    rates = {"cnn": RequestLogSpec(str(tmp_path / "cnn" / "requests"), 0.2),
             "vgg16": RequestLogSpec(str(tmp_path / "vgg16" / "requests"), 0.0)}
    logger = RequestLogger(rates.get, seed=7).start()
    log_arrays(logger, 1000)
    log_arrays(logger, 200, name="vgg16")
    logger.stop()
    records = list(read_logs(str(tmp_path / "cnn")))
    assert 140 <= len(records) <= 260       # 200 expected; binomial sd 12.6
    assert logger.counts()["cnn"].written == len(records)
    assert all(r.log_metadata.sampling_config.sampling_rate == pytest.approx(0.2)
               for r in records)
    # The sampled requests are spread over the stream, not its first fifth.
    assert max(index for _, index in logged_tags(records)) > 900
    assert "vgg16" not in logger.counts() and not (tmp_path / "vgg16").exists()


def test_files_rotate_by_size_and_by_age(tmp_path):
    spec = RequestLogSpec(str(tmp_path / "size" / "requests"))
    logger = RequestLogger(lambda name: spec,
                           RequestLogConfig(max_file_bytes=10_000, max_file_seconds=60)).start()
    log_arrays(logger, 20)     # ~2.4 kB each: a file closes with the record crossing 10 kB
    logger.stop()
    files = log_files(str(tmp_path / "size"))
    sizes = [os.path.getsize(f) for f in files]
    assert len(files) >= 3 and all(f.endswith(LOG_SUFFIX) for f in files), files
    assert all(10_000 <= size < 10_000 + 3_000 for size in sizes[:-1]), sizes
    assert [index for _, index in logged_tags(list(read_logs(files)))] == list(range(20))

    spec = RequestLogSpec(str(tmp_path / "age" / "requests"))
    logger = RequestLogger(lambda name: spec, RequestLogConfig(max_file_seconds=0.3)).start()
    try:
        log_arrays(logger, 1)
        deadline = time.monotonic() + 10
        # No further request comes: the writer still closes the file once it is 0.3 s old.
        while not list((tmp_path / "age").glob("*" + LOG_SUFFIX)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not [f for f in log_files(str(tmp_path / "age")) if f.endswith(OPEN_SUFFIX)]
        log_arrays(logger, 1)
    finally:
        logger.stop()
    assert len(log_files(str(tmp_path / "age"))) == 2


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    spec = RequestLogSpec(str(tmp_path / "cnn" / "requests"))
    logger = RequestLogger(lambda name: spec, RequestLogConfig(queue_records=5))
    started = time.monotonic()
    log_arrays(logger, 50)     # the writer is not running yet: the queue holds 5
    assert time.monotonic() - started < 5
    assert logger.counts()["cnn"].dropped == 45 and logger.queued() == 5
    assert 'fer_serve_request_log_dropped_total{model_name="cnn"} 45' in \
        logger.prometheus_lines()
    logger.start().stop()
    assert logger.counts()["cnn"].written == 5
    assert [index for _, index in logged_tags(list(read_logs(str(tmp_path))))] == \
        list(range(5))


def test_a_full_queue_in_the_server_fails_no_request(tmp_path, template):
    """A one-record queue under 8 concurrent clients: every request is answered; each
    sampled request is either written or counted as dropped in the metrics."""
    config, logs = serving_root(tmp_path, template)
    server = FerServer(ServerConfig(config, port=0, rest_port=0,
                                    request_log=RequestLogConfig(queue_records=1))).start()
    failures: list[str] = []
    sent = [0] * 8

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        for request in range(25):
            status, payload = rest_predict(connection, tagged_image(index, request))
            if status != 200:
                failures.append(str(payload))
            sent[index] += 1
        connection.close()

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 30
        while True:  # the writer counts a record once it is written
            counted = metrics(server.rest_port)
            if sum(counted.get(f'fer_serve_request_log_{field}_total{{model_name="cnn"}}', 0)
                   for field in ("written", "dropped")) == 200:
                break
            assert time.monotonic() < deadline, counted
            time.sleep(0.05)
    finally:
        server.stop()
    assert failures == [] and sum(sent) == 200
    written = counted['fer_serve_request_log_written_total{model_name="cnn"}']
    dropped = counted['fer_serve_request_log_dropped_total{model_name="cnn"}']
    assert written + dropped == 200
    assert len(list(read_logs(logs))) == written


# --- a server process under load ----------------------------------------------------------

CLIENTS, REQUESTS_PER_CLIENT = 16, 30


def load(grpc_port: int, rest_port: int, stop: threading.Event | None = None
         ) -> tuple[list[tuple[int, int]], list[str], list[threading.Thread]]:
    """16 clients, half over gRPC and half over REST, each sending REQUESTS_PER_CLIENT
    tagged faces; returns (tags answered, failures, threads) with the threads started."""
    answered: list[tuple[int, int]] = []
    failures: list[str] = []

    def grpc_client(index: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for request in range(REQUESTS_PER_CLIENT):
            if stop is not None and stop.is_set():
                break
            try:
                stub.Predict(predict_request(tagged_image(index, request)), timeout=30)
                answered.append((index, request))
            except grpc.RpcError as error:
                failures.append(f"gRPC {error.code()}")
        channel.close()

    def rest_client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=30)
        for request in range(REQUESTS_PER_CLIENT):
            if stop is not None and stop.is_set():
                break
            try:
                status, _ = rest_predict(connection, tagged_image(index, request))
            except (OSError, http.client.HTTPException) as error:
                failures.append(f"REST {type(error).__name__}")
                break
            if status == 200:
                answered.append((index, request))
            else:
                failures.append(f"REST {status}")
        connection.close()

    threads = [threading.Thread(target=grpc_client if i % 2 else rest_client, args=(i,))
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return answered, failures, threads


def test_sixteen_clients_at_sampling_rate_one_lose_no_request_and_no_record(tmp_path,
                                                                           template):
    """In this process (the kill test below runs its own): no server start-up to pay."""
    config, logs = serving_root(tmp_path, template)
    # Small files, so they also rotate under the load.
    server = FerServer(ServerConfig(config, port=0, rest_port=0, request_log=RequestLogConfig(
        max_file_bytes=50_000))).start()
    try:
        answered, failures, threads = load(server.grpc_port, server.rest_port)
        for thread in threads:
            thread.join()
        counted = metrics(server.rest_port)
    finally:
        server.stop()   # writes what is queued and closes the files
    assert failures == []
    assert len(answered) == CLIENTS * REQUESTS_PER_CLIENT
    assert counted['fer_serve_request_log_dropped_total{model_name="cnn"}'] == 0
    files = log_files(logs)
    assert len(files) > 2 and all(f.endswith(LOG_SUFFIX) for f in files)
    records = list(read_logs(logs))
    assert sorted(logged_tags(records)) == sorted(answered)   # each request logged once


def test_server_killed_mid_load_leaves_readable_logs(tmp_path, template):
    config, logs = serving_root(tmp_path, template)
    with open(tmp_path / "server.log", "w+") as log:
        process, grpc_port, rest_port = serve_in_subprocess(
            config, log, "--request-log-max-file-bytes", "100000")
        stop = threading.Event()
        try:
            answered, failures, threads = load(grpc_port, rest_port, stop)
            deadline = time.monotonic() + 60
            while len(answered) < CLIENTS * REQUESTS_PER_CLIENT // 3:
                assert time.monotonic() < deadline and not failures, failures
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            stop.set()
            if process.poll() is None:
                process.kill()
            for thread in threads:
                thread.join()
    closed = [f for f in log_files(logs) if f.endswith(LOG_SUFFIX)]
    still_open = [f for f in log_files(logs) if f.endswith(OPEN_SUFFIX)]
    # At most one open file: the writer opens the next file with the next record after a
    # rotation, so a kill between the two leaves none (CI's run hit that gap).
    assert closed and len(still_open) <= 1, still_open
    # Every closed file is whole: TF's own reader gets through it without an error.
    for path in closed:
        assert sum(1 for _ in tf.data.TFRecordDataset(path)) > 0
    records = list(read_logs(logs))
    tags = logged_tags(records)
    # Logged at most once each, and only what was answered, or a client's one request in
    # flight at the kill: the server logs an answer as it sends it, so the kill can land
    # between the two (CI's run under load hit that).
    assert len(set(tags)) == len(tags)
    next_request = {i: max((r for c, r in answered if c == i), default=-1) + 1
                    for i in range(CLIENTS)}
    in_flight = set(tags) - set(answered)
    assert all(request == next_request[client] for client, request in in_flight), in_flight
    assert len(tags) >= len(closed)
    # A file that ends mid-record (a kill during a write) reads up to its last complete
    # record while it is open; the same bytes under a closed file's name are an error.
    whole = open(closed[0], "rb").read()
    complete = len(list(read_logs([closed[0]])))
    (tmp_path / ("cut" + OPEN_SUFFIX)).write_bytes(whole[:-10])
    assert len(list(read_logs([str(tmp_path / ("cut" + OPEN_SUFFIX))]))) == complete - 1
    (tmp_path / ("cut" + LOG_SUFFIX)).write_bytes(whole[:-10])
    with pytest.raises(ValueError, match="corrupt request log"):
        list(read_logs([str(tmp_path / ("cut" + LOG_SUFFIX))]))


# --- the pusher writes the logging_config ------------------------------------------------------

def test_push_with_request_logs_configures_fer_serve_but_not_tf_serving(tmp_path, template):
    from fer_pipeline.components.pusher import _StorePlan, run_pusher, write_store_config
    from fer_pipeline.pipeline.cli import _config_from_args
    from fer_pipeline.pipeline.cli_parser import build_parser
    from fer_pipeline.core.config import PushConfig

    args = build_parser().parse_args(["push", "--output", str(tmp_path / "run"),
                                      "--request-log-dir", "logs",
                                      "--request-log-sampling-rate", "0.5"])
    push = _config_from_args(args).push
    assert (push.request_log_dir, push.request_log_sampling_rate) == ("logs", 0.5)

    shutil.copytree(template, tmp_path / "models" / "cnn" / "serving_model")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "blessings.json").write_text(json.dumps(
        {"cnn": {"blessed": True, "reasons": ["accuracy 0.8 >= 0.3"]}}))
    logs = tmp_path / "logs"
    result = run_pusher({"cnn": str(tmp_path / "models" / "cnn")}, str(tmp_path / "evaluation"),
                        None, str(tmp_path / "serving"), str(tmp_path / "push"),
                        PushConfig(request_log_dir=str(logs)))
    [spec] = read_model_server_config(result.models_config)
    assert spec.request_log == RequestLogSpec(str(logs.resolve() / "cnn" / "requests"), 1.0)
    [docker_spec] = read_model_server_config(result.docker_models_config)
    assert docker_spec.request_log is None
    assert "logging_config" not in open(result.docker_models_config).read()

    # What the pusher wrote, fer-serve follows: a request lands in logs/cnn/.
    server = FerServer(ServerConfig(result.models_config, port=0, rest_port=0)).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
        assert rest_predict(connection, tagged_image(3, 4))[0] == 200
        connection.close()
    finally:
        server.stop()
    assert logged_tags(list(read_logs(str(logs / "cnn")))) == [(3, 4)]

    # On an object store TF Serving reads models.config itself, so with request logs it
    # gets a twin without them (written, then removed once logs are off again).
    plan = _StorePlan(str(tmp_path / "store"), 1, {"cnn": [1]})
    os.makedirs(plan.root)
    write_store_config(plan, PushConfig(request_log_dir=str(logs)))
    twin = tmp_path / "store" / "models.docker.config"
    assert read_model_server_config(str(twin))[0].request_log is None
    assert read_model_server_config(str(tmp_path / "store" / "models.config"))[0].request_log
    write_store_config(plan, PushConfig())
    assert not twin.exists()
    with pytest.raises(ValueError, match="must be a local directory"):
        run_pusher({}, str(tmp_path / "evaluation"), None, str(tmp_path / "serving"),
                   str(tmp_path / "push"), PushConfig(request_log_dir="s3://bucket/logs"))


def test_request_log_writer_benchmark_runs(tmp_path):
    """benchmarks/request_log_writer.py end to end on a few records (its figures are read
    in docs/benchmarks.md, never asserted here)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "request_log_writer.py")
    spec = importlib.util.spec_from_file_location("request_log_writer_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--records", "40", "--out", str(tmp_path / "writer.json")]) == 0
    report = json.loads((tmp_path / "writer.json").read_text())
    assert set(report["results"]) == {"gRPC Predict", "REST predict"}
    for result in report["results"].values():
        assert result["records"] == 40 and result["bytes_per_record"] > 48 * 48 * 4
        assert result["writer_cpu_us"] > 0 and result["request_path_cpu_us"] >= 0
