"""Whose an error is, by its type alone (core/errors.py), and how a failed Beam job on a
cluster engine is told apart: the engine's problem (the user's to fix, exit 2) or our own
Python exception raised in a worker (a bug, exit 70 with its traceback saved)."""
from __future__ import annotations

import errno
import socket

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from fer_pipeline.core import errors
from fer_pipeline.core.net import free_port
from fer_pipeline.core.beam_job import (BeamJobFailed, BeamJobNotRun, BeamWorkerError,
                                        engine_failure, step_template, translation_args)
from fer_pipeline.core.config import ConfigError, load_config
from fer_pipeline.core.errors import (ConfigError as ErrorsConfigError, EngineError,
                                      InputDataError, MissingInputError, ResourceError,
                                      ServerUnreachable, UserError, is_user_error)


def test_the_hierarchy_keeps_the_classes_callers_catch():
    assert ConfigError is ErrorsConfigError
    assert issubclass(ConfigError, (UserError, ValueError))
    assert issubclass(InputDataError, (UserError, ValueError))
    assert issubclass(MissingInputError, UserError) and issubclass(MissingInputError,
                                                                  FileNotFoundError)
    assert issubclass(ResourceError, OSError) and issubclass(EngineError, RuntimeError)
    assert issubclass(ServerUnreachable, ConnectionError)
    for name in errors.__all__:
        assert hasattr(errors, name), name
    with pytest.raises(ValueError, match="nope"):
        load_config(profile="nope")


def test_is_user_error_reads_the_type_not_the_source():
    assert is_user_error(ConfigError("bad flag"))
    assert is_user_error(MissingInputError("no such file"))
    assert is_user_error(ServerUnreachable("nobody at localhost:8500"))
    assert is_user_error(BeamJobFailed("ingest: the Beam job failed on Flink: lost"))
    assert is_user_error(FileNotFoundError(errno.ENOENT, "No such file", "/x"))
    assert is_user_error(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert is_user_error(OSError(errno.ENOSPC, "No space left on device"))
    # Plain ValueErrors and OSErrors are bugs, whoever raised them, with any message.
    assert not is_user_error(ValueError("a message that reads as if for the user"))
    assert not is_user_error(OSError("cannot bind"))
    assert not is_user_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not is_user_error(RuntimeError("boom"))
    try:
        raise ValueError("raised by a `raise` line of ours")
    except ValueError as error:
        assert not is_user_error(error)
    assert not hasattr(errors, "_raised_on_purpose_by_our_code")
    assert not hasattr(errors, "_OUR_CODE")


def test_a_user_error_is_one_line_and_exit_2_a_plain_value_error_a_bug(capsys, monkeypatch,
                                                                       tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)

    def users(argv):
        raise InputDataError("data.csv: header lacks column(s) ['pixels']")

    def ours(argv):
        raise ValueError("data.csv: header lacks column(s) ['pixels']")

    assert errors.run_cli("fer-test", users) == errors.EXIT_USAGE
    assert capsys.readouterr().err == ("fer-test: error: data.csv: header lacks column(s) "
                                       "['pixels']\n")
    assert errors.run_cli("fer-test", ours) == errors.EXIT_BUG
    assert "internal error (ValueError" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Beam engines

def _endpoint_up():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


# Messages as the portable client receives them (shapes from tests/test_engines.py).
REFUSED = ("Pipeline BeamApp-root-1130071846-2762c4b8_ca4e5590 failed in state FAILED: "
           "java.net.ConnectException: java.net.ConnectException: finishConnect(..) failed: "
           "Connection refused")
LOST_TASKMANAGER = (
    "Pipeline BeamApp-x failed in state FAILED: org.apache.flink.runtime.rpc."
    "exceptions.RecipientUnreachableException: Could not send message [Remote"
    "RpcInvocation(TaskExecutorGateway.submitTask(...))] from sender [Actor[pekko://"
    "flink/temp/taskmanager_0$bC]] to recipient [Actor[pekko.tcp://flink@127.0.0.1:"
    "36729/user/rpc/taskmanager_0#648072594]], because the recipient is unreachable.")


def _worker_traceback(last_line: str) -> str:
    return ("Pipeline BeamApp-x failed in state FAILED: java.lang.RuntimeException: Error "
            "received from SDK harness for instruction 7: Traceback (most recent call last):\n"
            '  File "apache_beam/runners/common.py", line 1435, in process\n'
            f"{last_line}\n")


def test_our_exception_in_a_worker_is_a_bug_that_keeps_the_workers_cause_line():
    server, endpoint = _endpoint_up()
    with server:
        spark = PipelineOptions(["--runner=SparkRunner", f"--job_endpoint={endpoint}"])
        failure = engine_failure(spark, "ingest", RuntimeError(_worker_traceback(
            "NameError: name 'np' is not defined [while running 'Parse']")))
    assert isinstance(failure, BeamWorkerError) and not is_user_error(failure)
    assert str(failure) == (f"ingest: the Beam job failed on Spark (job server {endpoint}): "
                            "NameError: name 'np' is not defined [while running 'Parse']")


@pytest.mark.parametrize("last_line", [
    "MemoryError",
    "MemoryError: Unable to allocate 3.2 GiB for an array",
    "FileNotFoundError: [Errno 2] No such file or directory: '/data/fer.csv'",
    "ConnectionRefusedError: [Errno 111] Connection refused",
    "InputDataError: data.csv: header lacks column(s) ['pixels']",
    "OSError: [Errno 28] No space left on device",
    "RuntimeError: grpc StatusCode.UNAVAILABLE: failed to connect to all addresses",
])
def test_the_machines_or_users_problem_in_a_worker_is_an_engine_error(last_line):
    server, endpoint = _endpoint_up()
    with server:
        flink = PipelineOptions(["--runner=FlinkRunner", f"--job_endpoint={endpoint}"])
        failure = engine_failure(flink, "augment", RuntimeError(_worker_traceback(last_line)))
    assert isinstance(failure, BeamJobFailed) and isinstance(failure, EngineError)
    assert is_user_error(failure) and "\n" not in str(failure)
    assert str(failure).startswith("augment: the Beam job failed on Flink")


def test_engine_side_failures_are_engine_errors():
    server, endpoint = _endpoint_up()
    nothing_there = f"localhost:{free_port()}"
    with server:
        flink = PipelineOptions(["--runner=FlinkRunner", f"--job_endpoint={endpoint}",
                                 "--environment_type=EXTERNAL",
                                 f"--environment_config={nothing_there}"])
        refused = engine_failure(flink, "ingest", RuntimeError(REFUSED))
        lost = engine_failure(flink, "statistics", RuntimeError(LOST_TASKMANAGER))
    assert isinstance(refused, BeamJobFailed) and is_user_error(refused)
    assert f"SDK worker pool {nothing_there} named by --environment_config" in str(refused)
    assert isinstance(lost, BeamJobFailed)
    assert "a TaskManager is no longer reachable" in str(lost)
    down = PipelineOptions(["--runner=SparkRunner", f"--job_endpoint={nothing_there}"])
    # Even a worker's traceback: with the job server gone, the engine is what failed.
    for error in (RuntimeError(""), RuntimeError(_worker_traceback("KeyError: 'x'"))):
        failure = engine_failure(down, "augment", error)
        assert isinstance(failure, BeamJobFailed)
        assert str(failure).startswith(f"augment: cannot reach the Beam job server "
                                       f"{nothing_there} (--job_endpoint)")


def test_a_worker_bug_reaches_the_cli_as_report_bugs_line_with_the_cause(capsys, monkeypatch,
                                                                         tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    remote = _worker_traceback("NameError: name 'np' is not defined [while running 'Parse']")

    def main(argv):
        try:
            raise RuntimeError(remote)
        except RuntimeError as error:
            raise BeamWorkerError("ingest: the Beam job failed on Spark: NameError: name 'np' "
                                  "is not defined [while running 'Parse']") from error

    assert errors.run_cli("fer-pipeline", main) == errors.EXIT_BUG
    output = capsys.readouterr().err
    assert len(output.strip().splitlines()) == 1 and "bug in fer-pipeline" in output
    assert "NameError: name 'np' is not defined" in output
    [saved] = tmp_path.glob("fer-pipeline-crash-*.txt")
    assert 'File "apache_beam/runners/common.py", line 1435' in saved.read_text()
    assert "NameError: name 'np' is not defined" in saved.read_text()


# ----------------------------------------------------------------------------- Dataflow

def test_each_step_translates_to_its_own_template_and_staging():
    assert step_template("gs://b/t/job.json", "ingest") == "gs://b/t/job-ingest.json"
    assert step_template("gs://b/t/job", "augment") == "gs://b/t/job-augment"
    assert step_template("/tmp/w/fer.template.json", "transform") == \
        "/tmp/w/fer.template-transform.json"
    flags = ["--runner=DataflowRunner", "--template_location=gs://b/t/job.json",
             "--staging_location=gs://b/staging/"]
    options = PipelineOptions(translation_args(flags, "statistics")).get_all_options()
    assert options["template_location"] == "gs://b/t/job-statistics.json"
    assert options["staging_location"] == "gs://b/staging/statistics"
    only_temp = ["--runner=DataflowRunner", "--dry_run=True", "--temp_location=gs://b/tmp"]
    options = PipelineOptions(translation_args(only_temp, "ingest")).get_all_options()
    assert options["staging_location"] == "gs://b/tmp/staging/ingest"
    assert not options["template_location"]
    done = BeamJobNotRun("ingest", "gs://b/t/job-ingest.json")
    assert not is_user_error(done) and done.template == "gs://b/t/job-ingest.json"
    assert str(done).startswith("ingest: Dataflow translated the job and wrote its template")
