"""core/quiet.py: the known third-party noise is gone, our own lines and real errors stay."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from fer_pipeline.core import quiet
from tests.tls_fixtures import make_pki

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from fer_pipeline.core import quiet
    quiet.install()                      # as every entry point does, before TensorFlow loads
    import tensorflow_data_validation as tfdv
    import tensorflow as tf
    import apache_beam.io.tfrecordio     # logs the python-snappy hint at import
    from google.api_core import _python_version_support  # noqa: F401
    path = sys.argv[1]
    with tf.io.TFRecordWriter(path) as writer:
        from tensorflow_metadata.proto.v0 import statistics_pb2
        writer.write(statistics_pb2.DatasetFeatureStatisticsList().SerializeToString())
    tfdv.load_statistics(path)           # TF logs tf_record_iterator's deprecation here
    warnings.warn("our own warning stays", UserWarning)
    tf.get_logger().error("a real TensorFlow error stays")
    logging.getLogger("apache_beam.io.tfrecordio").warning("another Beam warning stays")
    os.write(2, b"a C++-level line stays\\n")
""")


def test_a_process_that_imports_everything_prints_only_real_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s.tfrecord")],
                            capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for noise in ("Unable to register", "Unable to import IPython",
                  "TFDV visualization APIs", "You are using a Python version",
                  "tf_record_iterator", "python-snappy", "oneDNN", "cuda drivers"):
        assert noise not in err, err
    for kept in ("our own warning stays", "a real TensorFlow error stays",
                 "another Beam warning stays", "a C++-level line stays"):
        assert kept in err, err


def test_filtered_stderr_drops_only_matching_lines(capfd):
    with quiet.filtered_stderr([re.compile(r"^noise \d+$")]):
        os.write(2, b"noise 1\nkeep me\nnoise 22\nnoise x\n")
    assert capfd.readouterr().err == "keep me\nnoise x\n"


GRPC_SCRIPT = textwrap.dedent("""
    import sys
    from concurrent import futures
    if sys.argv[1] == "quiet":
        from fer_pipeline.core import quiet
        quiet.install()                  # as every entry point does, before grpc loads
    import grpc
    cert, key = (open(path, "rb").read() for path in sys.argv[2:4])
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:   # plaintext against TLS
        try:
            channel.unary_unary("/a.Service/Method")(b"", timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    server.stop(None)
    try:                                 # a certificate the C core cannot load: its ERROR
        grpc.server(futures.ThreadPoolExecutor(1)).add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(b"not a key", b"not a cert")]))
    except RuntimeError:
        pass
""")


def test_grpc_handshake_lines_go_and_grpc_errors_stay(tmp_path):
    """A bare gRPC TLS server, refusing a plaintext client: gRPC writes its per-connection
    "Handshake failed" line without our settings and not with them; its errors stay."""
    pki = make_pki(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    err = {}
    for mode in ("plain", "quiet"):
        result = subprocess.run(
            [sys.executable, "-c", GRPC_SCRIPT, mode, str(pki.server_cert), str(pki.server_key)],
            capture_output=True, text=True, env=env, timeout=120,
            cwd=os.path.dirname(os.path.dirname(__file__)))
        assert result.returncode == 0, result.stderr
        err[mode] = result.stderr
    assert "Handshake failed" in err["plain"], err["plain"]
    assert "Handshake failed" not in err["quiet"], err["quiet"]
    assert "Unable to create secure server" in err["quiet"], err["quiet"]
