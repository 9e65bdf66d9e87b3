"""The client door: `fer-client` says in one line why it could not talk to a server
(nothing listening, the wrong protocol or port, TLS, no answer in time), refuses inputs
that select nothing, never lets OpenCV speak first, takes the review tolerance from the
pipeline's config, and the review export is an ordinary file.

Table-driven and in-process (`fer_pipeline.serving.client_cli.main`); the "servers" are the smallest real
thing of each kind on 127.0.0.1: a gRPC server, an HTTP server, a TLS server, a socket that
never answers.
"""
from __future__ import annotations

import datetime
import http.server
import os
import socket
import ssl
import stat
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from fer_pipeline.core import errors
from fer_pipeline.serving import client_cli as fer_client
from fer_pipeline.serving.review_queue import ReviewQueue
from fer_pipeline.core.net import free_port
from tests.serving_fixtures import random_images


def _self_signed(directory) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = str(directory / "cert.pem"), str(directory / "key.pem")
    with open(cert_path, "wb") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert_path, key_path


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 server that keeps its own errors (an HTTP/2 preface) off stderr, where
    the test looks for the client's one line."""

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """Ports of: a gRPC server, an HTTP/1.1 server, a TLS server, a silent listener, none."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()

    http_server = QuietHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path_factory.mktemp("tls")))
    tls = socket.create_server(("127.0.0.1", 0))

    def answer_tls(connection: socket.socket) -> None:
        connection.settimeout(5)
        try:
            with context.wrap_socket(connection, server_side=True) as secure:
                secure.recv(1)
        except (OSError, ssl.SSLError):
            connection.close()

    def serve_tls():
        while True:
            try:
                connection, _ = tls.accept()
            except OSError:
                return
            threading.Thread(target=answer_tls, args=(connection,), daemon=True).start()

    threading.Thread(target=serve_tls, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))   # listens, never accepts or answers
    yield {"grpc": grpc_port, "http": http_server.server_address[1],
           "tls": tls.getsockname()[1], "silent": silent.getsockname()[1],
           "nothing": free_port()}
    grpc_server.stop(0)
    http_server.shutdown()
    tls.close()
    silent.close()


# (client protocol, endpoint, words of the one line)
CONNECTION_FAILURES = [
    ("rest", "nothing", ["not reachable after 2 attempt(s)", "nothing is listening"]),
    ("grpc", "nothing", ["not reachable", "nothing is listening", "fer-serve running"]),
    ("rest", "grpc", ["speaks HTTP/2 (a gRPC port), not REST", "--protocol grpc", "8501"]),
    ("grpc", "http", ["speaks HTTP/1.x (a REST port), not gRPC", "--protocol rest", "8500"]),
    ("rest", "tls", ["expects TLS", "plaintext"]),
    ("grpc", "tls", ["expects TLS", "plaintext"]),
    ("rest", "silent", ["does not answer within 1 s"]),
    ("grpc", "silent", ["does not answer within 1 s"]),
]


@pytest.mark.parametrize("protocol, endpoint, words", CONNECTION_FAILURES,
                         ids=[f"{p}-to-{e}" for p, e, _ in CONNECTION_FAILURES])
def test_a_connection_failure_is_one_line_saying_why(endpoints, tmp_path, capfd, protocol,
                                                     endpoint, words):
    np.save(tmp_path / "faces.npy", random_images(1))
    status = fer_client.main(["--npy", str(tmp_path / "faces.npy"), "--protocol", protocol,
                              "--port", str(endpoints[endpoint]), "--timeout", "1",
                              "--retries", "1", "--backoff", "0.05"])
    out, err = capfd.readouterr()
    assert status == fer_client.EXIT_UNAVAILABLE, err
    assert out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fer-client")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _csv(tmp_path) -> str:
    images = random_images(2)
    path = tmp_path / "faces.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(
        f"3,{' '.join(map(str, image.ravel()))},{usage}\n"
        for image, usage in zip(images, ["Training", "PrivateTest"])))
    return str(path)


# (arguments, with {csv}, {tmp} and {port} filled in; exit status; words of the message)
INPUT_MISTAKES = [
    (["--csv", "{csv}", "--usage", "Privatetest"], fer_client.EXIT_BAD_INPUT,
     ["no row has Usage 'Privatetest'", "'PrivateTest'", "'Training'"]),
    (["--image", "{tmp}/photo.jpg"], fer_client.EXIT_BAD_INPUT,
     ["--image", "photo.jpg", "no such file"]),
    (["--csv", "{tmp}/typo.csv"], fer_client.EXIT_BAD_INPUT, ["typo.csv"]),
    (["--npy", "{csv}", "--tolerance", "5"], fer_client.EXIT_BAD_INPUT,
     ["--tolerance must be between 0 and 1"]),
    (["--csv", "{csv}", "--config", "{tmp}/bad.yaml"], fer_client.EXIT_BAD_INPUT,
     ["bad.yaml", "evaluation.tie_tolerance", "expected a number"]),
    (["--csv", "{csv}", "--rows", "0"], fer_client.EXIT_BAD_INPUT, ["--rows must be at least 1"]),
    (["--csv", "{csv}", "--timeout", "0"], fer_client.EXIT_BAD_INPUT,
     ["--timeout must be a positive number"]),
]


@pytest.mark.parametrize("argv, status, words", INPUT_MISTAKES,
                         ids=[f"{i}-{case[0][-2]}" for i, case in enumerate(INPUT_MISTAKES)])
def test_an_input_mistake_is_one_line(tmp_path, capfd, argv, status, words):
    (tmp_path / "bad.yaml").write_text("evaluation: {tie_tolerance: wide}\n")
    values = {"csv": _csv(tmp_path), "tmp": str(tmp_path), "port": str(free_port())}
    got = fer_client.main([a.format(**values) for a in argv])
    out, err = capfd.readouterr()
    assert got == status, err
    assert "Traceback" not in err and "[ WARN" not in err   # OpenCV's own warning line
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_the_tolerance_comes_from_the_pipeline_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("evaluation: {tie_tolerance: 0.2}\n")
    args = fer_client.parse_args(["--npy", "x.npy", "--config", str(config)])
    assert fer_client.tolerance(args) == 0.2
    args = fer_client.parse_args(["--npy", "x.npy", "--config", str(config),
                                  "--tolerance", "0.01"])
    assert fer_client.tolerance(args) == 0.01
    args = fer_client.parse_args(["--npy", "x.npy"])
    assert fer_client.tolerance(args) == 0.05


def test_a_client_bug_is_one_line_with_its_traceback_saved(tmp_path, capfd, monkeypatch):
    def broken(args):
        raise KeyError("pixels")

    monkeypatch.setattr(fer_client, "_load_inputs", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    assert fer_client.main(["--npy", "x.npy"]) == errors.EXIT_BUG
    err = capfd.readouterr().err
    assert "Traceback" not in err and "bug in fer-pipeline" in err
    [saved] = tmp_path.glob("fer-client-crash-*.txt")
    assert "KeyError" in saved.read_text()


def test_the_review_export_is_an_ordinary_file(tmp_path):
    out = tmp_path / "reviewed.csv"
    with ReviewQueue(str(tmp_path / "queue")) as queue:
        queue.export_csv(str(out))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
