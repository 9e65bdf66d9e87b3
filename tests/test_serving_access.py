"""Who may talk to fer-serve and who may change what it serves (serving/access.py).

TLS from TF Serving's SSLConfig on both ports with a CA made at test time
(tests/tls_fixtures.py): a TLS client is served, a plaintext one fails with a line that says
why, and with client_verify a client without a certificate of the server's CA is refused
on gRPC and REST, leaving no line of gRPC's in fer-serve's output. HandleReloadConfigRequest:
only under the allowed roots, nothing created when refused, and switched off with
--no-reload-config. Real servers on 127.0.0.1.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import ssl

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.access import AccessConfig
from fer_pipeline.serving.client import FerClient, ServerUnavailable
from fer_pipeline.serving.client_cli import main as client_main
from fer_pipeline.serving.reload_policy import ReloadPolicy
from fer_pipeline.serving.server import FerServer, ServerConfig, parse_args
from fer_pipeline.serving.tls import ClientTLS, parse_ssl_config
from tests.serving_fixtures import (push_version, random_images, save_tiny_model,
                                    serve_in_subprocess)
from tests.tls_fixtures import make_pki, ssl_config_text


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def serving_root(tmp_path_factory):
    """<root>/models.config serving <root>/cnn version 1."""
    root = tmp_path_factory.mktemp("serving")
    template = save_tiny_model(str(tmp_path_factory.mktemp("template") / "model"))
    push_version(str(root / "cnn"), 1, template)
    return write_model_server_config(str(root / "models.config"),
                                     [ModelSpec("cnn", str(root / "cnn"))])


def _start(config: str, access: AccessConfig) -> FerServer:
    return FerServer(ServerConfig(config, port=0, rest_port=0, access=access)).start()


@pytest.fixture(scope="module")
def mutual(serving_root, pki):
    """A server whose SSLConfig says client_verify: true."""
    server = _start(serving_root, AccessConfig(ssl=parse_ssl_config(ssl_config_text(pki, True))))
    yield server
    server.stop()


def _predict_request() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cnn"
    request.model_spec.signature_name = "serving_uint8"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(random_images(1)))
    return request


def _grpc_predict(port: int, credentials=None):
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, credentials) if credentials is not None
          else grpc.insecure_channel(target)) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            _predict_request(), timeout=10)


def _rest_status(port: int, context=None) -> int:
    connection = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                  if context is not None else http.client.HTTPConnection("127.0.0.1", port,
                                                                         timeout=10))
    try:
        body = json.dumps({"signature_name": "serving_uint8",
                           "instances": random_images(1).astype(int).tolist()})
        connection.request("POST", "/v1/models/cnn:predict", body=body)
        response = connection.getresponse()
        assert len(json.loads(response.read())["predictions"]) == 1
        return response.status
    finally:
        connection.close()


def test_mutual_tls_serves_certified_clients_and_refuses_the_others(mutual, pki):
    certified = ClientTLS(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert _grpc_predict(mutual.grpc_port, certified.grpc_credentials()).model_spec.name == "cnn"
    assert _rest_status(mutual.rest_port, certified.ssl_context()) == 200

    # TLS without a client certificate, with one of another CA, and plaintext: refused.
    for tls in (ClientTLS(str(pki.ca)),
                ClientTLS(str(pki.ca), str(pki.stranger_cert), str(pki.stranger_key))):
        with pytest.raises(grpc.RpcError) as refused:
            _grpc_predict(mutual.grpc_port, tls.grpc_credentials())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _rest_status(mutual.rest_port, tls.ssl_context())
    with pytest.raises(grpc.RpcError) as plaintext:
        _grpc_predict(mutual.grpc_port)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        _rest_status(mutual.rest_port)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_fer_client_over_tls_and_its_one_line_reasons(mutual, pki, protocol):
    def client(tls):
        return FerClient("127.0.0.1", mutual.grpc_port, mutual.rest_port, protocol,
                         timeout=5, retries=0, tls=tls)

    answer = client(ClientTLS(str(pki.ca), str(pki.client_cert), str(pki.client_key))
                    ).predict("cnn", random_images(2))
    assert answer.probabilities.shape == (2, 7) and answer.version == 1
    for tls, fragments in ((None, ["expects TLS", "--tls-ca"]),
                           (ClientTLS(str(pki.ca)), ["client certificate", "--tls-cert"])):
        with pytest.raises(ServerUnavailable) as refused:
            client(tls).predict("cnn", random_images(1))
        message = str(refused.value)
        assert "\n" not in message and all(f in message for f in fragments), message


def test_fer_client_cli_tls_flags(mutual, pki, tmp_path, capsys):
    faces = tmp_path / "faces.npy"
    np.save(faces, random_images(2))
    code = client_main(["--npy", str(faces), "--protocol", "rest", "--port",
                        str(mutual.rest_port), "--models", "cnn", "--retries", "0",
                        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                        "--tls-key", str(pki.client_key)])
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == 2
    code = client_main(["--npy", str(faces), "--models", "cnn", "--tls-cert",
                        str(pki.client_cert)])
    assert code == 3 and "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_tls_without_client_verify_serves_any_tls_client(serving_root, pki):
    server = _start(serving_root, AccessConfig(ssl=parse_ssl_config(ssl_config_text(pki,
                                                                                    False))))
    try:
        tls = ClientTLS(str(pki.ca))
        assert _grpc_predict(server.grpc_port, tls.grpc_credentials()).model_spec.name == "cnn"
        assert _rest_status(server.rest_port, tls.ssl_context()) == 200
    finally:
        server.stop()


def test_refused_handshakes_leave_no_grpc_lines_in_fer_serve_output(serving_root, pki,
                                                                     tmp_path, monkeypatch):
    """fer-serve as its own process (its entry point, core/quiet.py's settings), with
    client_verify: a plaintext client and one without a client certificate are refused, the
    server's stderr holds none of the gRPC C core's per-connection handshake lines, and a
    certified client is served afterwards. (tests/test_quiet.py shows gRPC prints them
    without our setting.)"""
    # conftest's quiet.install() set it in this process: the child must set it itself.
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(ssl_config_text(pki, True))
    with open(tmp_path / "server.log", "w+") as log:
        process, grpc_port, rest_port = serve_in_subprocess(
            serving_root, log, "--ssl-config-file", str(ssl_config))
        try:
            for credentials in (None, ClientTLS(str(pki.ca)).grpc_credentials()):
                with pytest.raises(grpc.RpcError) as refused:
                    _grpc_predict(grpc_port, credentials)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                _rest_status(rest_port)
            certified = ClientTLS(str(pki.ca), str(pki.client_cert), str(pki.client_key))
            assert _grpc_predict(grpc_port, certified.grpc_credentials()).model_spec.name \
                == "cnn"
            assert _rest_status(rest_port, certified.ssl_context()) == 200
        finally:
            process.terminate()
            process.wait(timeout=30)
        log.seek(0)
        err = log.read()
    assert process.returncode == 0, err
    assert "Handshake failed" not in err, err
    # No line of the C core at all (absl's "I1206 18:20:44.677832 ... file.cc:123]" form).
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", err,
                         re.MULTILINE), err


def test_unusable_ssl_configs_are_one_line_errors(pki, tmp_path):
    key, cert = json.dumps(pki.server_key.read_text()), json.dumps(pki.server_cert.read_text())
    stranger_key = json.dumps(pki.stranger_key.read_text())
    for text, fragment in (
            ("server_key: 3 oops", "not a text-format SSLConfig"),
            (f"server_key: {key}", "server_cert is missing"),
            (f'server_key: "{pki.server_key}"\nserver_cert: {cert}', "PEM text itself"),
            (f"server_key: {key}\nserver_cert: {cert}\nclient_verify: true", "needs custom_ca"),
            (f"server_key: {stranger_key}\nserver_cert: {cert}", "not a usable key")):
        with pytest.raises(ConfigError) as error:
            parse_ssl_config(text)
        assert fragment in str(error.value) and "\n" not in str(error.value)
    path = tmp_path / "ssl.config"
    path.write_text(ssl_config_text(pki, True))
    args = parse_args(["--model-config", "m", "--ssl_config_file", str(path)])
    assert args.access.ssl.client_verify and args.access.reload_config


# --- HandleReloadConfigRequest ---------------------------------------------------------------

def _reload(port: int, *specs: tuple[str, str, str]) -> None:
    """A reload to (name, base_path, request-log prefix or "") models."""
    request = model_management_pb2.ReloadConfigRequest()
    for name, base, log_prefix in specs:
        entry = request.config.model_config_list.config.add(name=name, base_path=base)
        if log_prefix:
            entry.logging_config.log_collector_config.type = "tfrecord"
            entry.logging_config.log_collector_config.filename_prefix = log_prefix
            entry.logging_config.sampling_config.sampling_rate = 1.0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            request, timeout=60)
    assert answer.status.error_code == 0


def test_reload_outside_the_allowed_roots_is_refused_and_creates_nothing(serving_root,
                                                                          tmp_path):
    root = os.path.dirname(serving_root)
    base = os.path.join(root, "cnn")
    outside = tmp_path / "outside"
    os.symlink(tmp_path, os.path.join(root, "link"))   # inside by name, outside in truth
    server = _start(serving_root, AccessConfig())      # default: models.config's directory
    try:
        for spec in (("cnn", str(outside / "cnn"), ""),
                     ("cnn", os.path.join(root, "..", outside.name, "cnn"), ""),
                     ("cnn", os.path.join(root, "link", "outside", "cnn"), ""),
                     ("cnn", base, str(outside / "logs" / "requests"))):
            with pytest.raises(grpc.RpcError) as refused:
                _reload(server.grpc_port, spec)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside the roots" in refused.value.details()
            assert not outside.exists()
            assert server.manager.model_names() == ["cnn"]
        # Under the root: applied, and its request log is written there.
        _reload(server.grpc_port, ("cnn", base, os.path.join(root, "logs", "requests")),
                ("cnn_too", base, ""))
        assert server.manager.model_names() == ["cnn", "cnn_too"]
        assert _grpc_predict(server.grpc_port).model_spec.name == "cnn"
    finally:
        server.stop()
    assert os.listdir(os.path.join(root, "logs"))


def test_reload_switched_off_and_other_roots(serving_root, tmp_path):
    server = _start(serving_root, AccessConfig(reload_config=False))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _reload(server.grpc_port, ("cnn", os.path.join(os.path.dirname(serving_root),
                                                           "cnn"), ""))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--no-reload-config" in refused.value.details()
    finally:
        server.stop()
    args = parse_args(["--model-config", serving_root, "--allowed-root", str(tmp_path / "a"),
                       "--allowed-root", str(tmp_path / "b"), "--no-reload-config"])
    assert not args.access.reload_config
    policy = args.access.reload_policy(serving_root)
    assert policy.roots == (str(tmp_path / "a"), str(tmp_path / "b"))
    ReloadPolicy(policy.roots).check([ModelSpec("m", str(tmp_path / "b" / "m"))])
    with pytest.raises(Exception, match="outside the roots"):
        ReloadPolicy(policy.roots).check([ModelSpec("m", os.path.dirname(serving_root))])
