"""How every Beam step runs its pipeline, on whichever engine the Beam flags name.

    with beam_pipeline(beam_args, "ingest") as pipeline:
        pipeline | ...        # build; the job runs (and is waited for) when the block ends

The flags are the user's, untouched: the DirectRunner by default, or e.g.
`--runner=FlinkRunner --job_endpoint=HOST:8099 --environment_type=EXTERNAL
--environment_config=localhost:50000` for a Flink cluster (`SparkRunner` likewise,
`DataflowRunner` for Google's service). What this adds is the ending: when a job fails on
a cluster engine, the step stops with one line naming the engine, the step and the
engine's own reason, instead of a Python traceback of the client's polling loop, which
says nothing about the cluster. Whose failure it is decides how it ends:

- the engine's (a lost TaskManager, a job server or worker pool that refuses connections,
  out of memory, a file or server on the user's side that a worker cannot reach):
  `BeamJobFailed`, an EngineError (core/errors.py), exit status 2;
- our own Python exception raised in a worker (a NameError in a DoFn): `BeamWorkerError`,
  a bug, reported as one (exit status 70, the traceback saved), its line still naming the
  worker's exception type and message.

The step's previous committed output stays in force, as for any failed step
(pipeline/runner.py). A Dataflow translation without submission (`--template_location`,
`--dry_run`) writes each step's job to a template of its own and ends the step with
`BeamJobNotRun`, which the runner reports as a success (nothing ran, nothing committed).

A failure on the in-process DirectRunner is raised unchanged: there the traceback is ours
and useful. Bulk inference (`fer-pipeline infer`) and any new Beam step should build their
pipelines here too, so they run on the same engines and fail the same way.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import socket
import threading
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  PortableOptions, S3Options,
                                                  StandardOptions, TestOptions)

from fer_pipeline.core import fileio
from fer_pipeline.core.credentials import redact_text
from fer_pipeline.core.errors import EngineError, UserError

# Imported by every SDK worker when it starts (core/beam_worker.py says why).
WORKER_PLUGIN = "fer_pipeline.core.beam_worker"
# The runners whose jobs run elsewhere, and the engine each names in an error.
ENGINE_OF_RUNNER = {
    "FlinkRunner": "Flink",
    "SparkRunner": "Spark",
    "PortableRunner": "the portable job server",
    "DataflowRunner": "Dataflow",
    "PrismRunner": "Prism",
}
# Java exception class names carry no information a user needs in the one line.
_JAVA_EXCEPTION = re.compile(r"\b(?:[a-z_$][\w$]*\.)+([A-Z][\w$]*(?:Exception|Error))\b")
_PORTABLE_FAILURE = re.compile(r"^Pipeline \S+ failed in state \w+:\s*", re.S)
_MAX_REASON_CHARS = 400
# Flink reports a lost TaskManager in words that depend on what noticed first. The
# heartbeat says it plainly ("TaskManager with id ... is no longer reachable"); these
# others are restated in those words: an RPC to it ("RecipientUnreachableException ...
# taskmanager_0 ... the recipient is unreachable"), a data exchange ("Connection
# unexpectedly closed by remote task manager"), a heartbeat timeout.
_LOST_TASKMANAGER = re.compile(
    r"RecipientUnreachable.*taskmanager|remote task manager"
    r"|Heartbeat of TaskManager .* timed out", re.I)


class JobServerStagingOptions(PipelineOptions):
    """A Java job-server option that Beam's Python SDK does not declare, so that our CLI
    accepts it and Beam's portable client passes it on to the job server.

    The local clusters (tools/local_cluster.py) set it to
    `ferpipeline.engines.NothingToStage`: their daemons already hold Beam's jars, so the
    job server ships none of its ~200 MB classpath with each job (measured: 20-30 s of
    every job's start on 2 cores). Stock Flink or Spark clusters need those jars shipped:
    leave it unset there.
    """

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--pipeline_resources_detector_factory_class", default=None,
            help="Java class (on the job server's classpath) that picks the jars a Flink "
                 "or Spark job server ships with each job; default: its whole classpath")


class BeamJobFailed(EngineError):
    """A step's Beam job failed on a cluster engine for the engine's reasons (or the
    user's: a worker that cannot reach their files); the message says where and why."""


class BeamWorkerError(RuntimeError):
    """Our own code raised an exception in a worker of a cluster engine: a bug. The message
    is the failure line (the worker's exception type and message); the engine's whole
    report, with the worker's traceback, is the exception's __cause__."""


class BeamJobNotRun(Exception):
    """Not an error: the flags asked Dataflow only to translate the job
    (`--template_location`, `--dry_run`). The job spec is written, to `template` (empty for
    a dry run); nothing ran, so the step has no output. The runner ends the step here."""

    def __init__(self, step: str, template: str) -> None:
        self.step, self.template = step, template
        super().__init__(f"{step}: Dataflow translated the job " + (
            f"and wrote its template to {template}" if template else "(dry run)")
            + "; nothing ran, so the step has no output to commit")


# Exceptions raised in a worker that are not our bug: the machine's or the engine's (out
# of memory, a connection), or the user's (a file that is not there, one of our UserErrors).
_WORKER_ENVIRONMENT_ERRORS = {
    "MemoryError", "TimeoutError", "ConnectionError", "ConnectionRefusedError",
    "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "FileNotFoundError",
    "PermissionError", "IsADirectoryError", "NotADirectoryError", "FileExistsError",
}
# ...and an RPC to the runner or the worker pool that failed (the harness lost its runner).
_WORKER_CONNECTION = re.compile(r"StatusCode\.UNAVAILABLE|Connection refused|No space left",
                                re.I)


def is_cluster_runner(options: PipelineOptions) -> bool:
    """True when the job runs outside this process on an engine we name in errors."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return _runner_name(runner) in ENGINE_OF_RUNNER


@contextlib.contextmanager
def beam_pipeline(beam_args: Sequence[str], step: str) -> Iterator[beam.Pipeline]:
    """A Beam pipeline for `step`, run and waited for when the `with` block ends.

    An error while building it (in the block) is raised as it is; a job that fails on a
    cluster engine becomes BeamJobFailed (the engine's) or BeamWorkerError (our code's, in
    a worker); a Dataflow translation without submission ends with BeamJobNotRun once the
    step's job spec is written (translation_args says where).
    """
    beam_args = [*beam_args, f"--beam_plugins={WORKER_PLUGIN}"]
    options = PipelineOptions(beam_args)
    if translate_only(options):
        options = PipelineOptions(translation_args(beam_args, step))
        staging = options.view_as(GoogleCloudOptions).staging_location
        if staging and not fileio.is_uri(staging):
            os.makedirs(staging, exist_ok=True)   # Beam copies into a local one, never makes it
        pipeline = beam.Pipeline(options=options)
        yield pipeline
        pipeline.run()   # translates, stages and writes the template; submits nothing
        raise BeamJobNotRun(step, options.view_as(GoogleCloudOptions).template_location or "")
    # Decided before the pipeline exists: Beam replaces the runner name in `options` by
    # the runner object it creates.
    on_cluster = is_cluster_runner(options)
    built = False
    try:
        with _engine_messages_kept_back(), beam.Pipeline(options=options) as pipeline:
            yield pipeline
            built = True        # from here on, errors come from running the job
    except Exception as error:  # noqa: BLE001 - whatever the engine raised, said in one line
        if not (built and on_cluster):
            raise
        raise engine_failure(PipelineOptions(list(beam_args)), step, error) from error


def engine_failure(options: PipelineOptions, step: str, error: BaseException) -> Exception:
    """What a job that failed on a cluster engine ends the step with: BeamWorkerError when
    our own code raised in a worker (a bug), else BeamJobFailed (the engine's, the user's
    to fix); either way describe_failure's one line."""
    # The engine's message may quote the job's options: no credential leaves in it.
    given = [f"--{name}={value}" for name, value in
             options.get_all_options(drop_default=True).items() if isinstance(value, str)]
    line = redact_text(describe_failure(options, step, error), given)
    if _our_exception_in_a_worker(str(error)) and " cannot reach the Beam job server " \
            not in line:
        return BeamWorkerError(line)
    return BeamJobFailed(line)


def _our_exception_in_a_worker(message: str) -> bool:
    """A Python traceback from a worker (the SDK harness) whose exception is not about the
    machine, a connection, or the user's files."""
    if "Traceback (most recent call last)" not in message:
        return False
    exceptions = [match for match in (
        re.match(r"^([A-Z]\w*(?:Error|Exception))\b(.*)$", line.strip())
        for line in message.splitlines()) if match]
    if not exceptions:
        return False
    match, reason = exceptions[-1], exceptions[-1].group(0)
    name = match.group(1)
    return not (name in _WORKER_ENVIRONMENT_ERRORS or name in _user_error_names()
                or _WORKER_CONNECTION.search(reason) or _LOST_TASKMANAGER.search(reason))


def _user_error_names() -> set[str]:
    names, pending = set(), [UserError]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


def translation_args(beam_args: Sequence[str], step: str) -> list[str]:
    """The flags for translating `step` alone: its template at `--template_location` with
    the step's name before the extension (job.json -> job-ingest.json), and its staged
    files (the pipeline proto the template points at) under `<staging_location>/<step>`, so
    that the Beam steps of one run do not overwrite each other's."""
    options = PipelineOptions(list(beam_args))
    cloud = options.view_as(GoogleCloudOptions)
    args = list(beam_args)
    if cloud.template_location:
        args.append(f"--template_location={step_template(cloud.template_location, step)}")
    staging = cloud.staging_location or (
        cloud.temp_location and cloud.temp_location.rstrip("/") + "/staging")
    if staging:
        args.append(f"--staging_location={staging.rstrip('/')}/{step}")
    return args


def step_template(template_location: str, step: str) -> str:
    """`gs://b/t/job.json` -> `gs://b/t/job-ingest.json`; `gs://b/t/job` -> `.../job-ingest`."""
    head, sep, name = template_location.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    name = f"{stem}-{step}.{ext}" if dot and stem else f"{name}-{step}"
    return head + sep + name


class _EngineMessages(logging.Filter):
    """Beam's portable client logs every message of the job server on the root logger
    (`portable_runner.read_messages`): at ERROR, a failed job's whole Java stack trace,
    before our one line restates its cause. Those records are dropped unless -v asked
    for INFO; the engine keeps them in its own logs (Flink's and Spark's UIs, job server)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "portable_runner" and record.funcName == "read_messages"
                    and not logging.getLogger().isEnabledFor(logging.INFO))


@contextlib.contextmanager
def _engine_messages_kept_back() -> Iterator[None]:
    root, kept_back = logging.getLogger(), _EngineMessages()
    root.addFilter(kept_back)
    try:
        yield
    finally:
        root.removeFilter(kept_back)


def translate_only(options: PipelineOptions) -> bool:
    """Dataflow asked to write a template or to build the job without submitting it."""
    runner = _runner_name(options.view_as(StandardOptions).runner or "DirectRunner")
    return runner == "DataflowRunner" and bool(
        options.view_as(GoogleCloudOptions).template_location
        or options.view_as(TestOptions).dry_run)


def engine_name(options: PipelineOptions) -> str:
    """`Flink (job server 127.0.0.1:8099)`: the engine and where the job went."""
    runner = _runner_name(options.view_as(StandardOptions).runner or "DirectRunner")
    engine = ENGINE_OF_RUNNER.get(runner, runner)
    endpoint = options.view_as(PortableOptions).job_endpoint
    if endpoint and runner != "DataflowRunner":
        return f"{engine} (job server {endpoint})"
    return engine


def describe_failure(options: PipelineOptions, step: str, error: BaseException) -> str:
    """One line: the step, the engine, and the engine's reason, with a hint when we can
    tell more than the engine did (a worker pool that is not there)."""
    reason = failure_reason(str(error)) or type(error).__name__
    if _LOST_TASKMANAGER.search(reason):
        reason = f"a TaskManager is no longer reachable ({reason})"
    line = f"{step}: the Beam job failed on {engine_name(options)}: {reason}"
    job_server = options.view_as(PortableOptions).job_endpoint
    if job_server and job_server != "embed" and not _accepts_connections(job_server):
        return (f"{step}: cannot reach the Beam job server {job_server} (--job_endpoint) "
                f"for {engine_name(options).split(' (')[0]}: is it running? "
                "(`make flink-up` / `make spark-up` start one)")
    pool = _unreachable_worker_pool(options, reason)
    if pool:
        line += (f" (the SDK worker pool {pool} named by --environment_config refuses "
                 "connections: is it running? `make flink-up` / `make spark-up` start one)")
    return line


def failure_reason(message: str) -> str:
    """The engine's reason from a failed job's message, on one line and without the
    client's prefix ("Pipeline BeamApp-... failed in state FAILED:") or Java class names.

    Python exceptions raised in a worker arrive as a whole remote traceback; their last
    line (`NameError: name 'x' is not defined [while running 'Parse']`) is the reason.
    """
    text = _PORTABLE_FAILURE.sub("", message.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    python_errors = [line for line in lines
                     if re.match(r"^[A-Z]\w*(?:Error|Exception)\b.*:", line)]
    reason = python_errors[-1] if python_errors else lines[0]
    # "java.net.ConnectException: java.net.ConnectException: finishConnect(..) failed"
    # -> "ConnectException: finishConnect(..) failed"
    reason = _JAVA_EXCEPTION.sub(lambda m: m.group(1), reason)
    reason = re.sub(r"^(\w+): (?:\1: )+", r"\1: ", reason)
    reason = reason.rstrip(": ")
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS - 3] + "..."
    return reason


def _unreachable_worker_pool(options: PipelineOptions, reason: str) -> str:
    portable = options.view_as(PortableOptions)
    if (portable.environment_type or "").upper() != "EXTERNAL":
        return ""
    if "refused" not in reason.lower() and "unavailable" not in reason.lower():
        return ""
    address = portable.environment_config or ""
    return "" if _accepts_connections(address) else address


def _accepts_connections(address: str) -> bool:
    """True when HOST:PORT accepts a TCP connection from here (or is not HOST:PORT)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return True
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=2):
            return True
    except OSError:
        return False


def _runner_name(runner: object) -> str:
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- S3 clients

# Beam's S3 filesystem wraps every single operation (exists, match, open, copy, delete) in
# a new S3IO, and each S3IO builds a new boto3 session and client, which loads botocore's
# S3 service model again: about 0.3 s of CPU each on these machines, and ingest, augment
# and transform of a small CSV on s3:// made 88 of them (30 s of CPU). One boto3 client per
# set of S3 settings, shared, removes that; boto3 clients are thread-safe. Beam's wrapper
# around it keeps per-download state, so each S3IO still gets a wrapper of its own: a
# shallow copy of one built once per settings and never used itself.
_S3_SETTINGS = ("s3_access_key_id", "s3_secret_access_key", "s3_session_token",
                "s3_endpoint_url", "s3_region_name", "s3_api_version", "s3_verify",
                "s3_disable_ssl")


def share_s3_clients() -> None:
    """Makes Beam's S3 filesystem reuse one boto3 client per S3 settings (idempotent)."""
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:      # Beam without boto3: no s3:// for Beam at all
        return
    if getattr(boto3_client.Client, "shares_boto3_clients", False):
        return
    beams_client = boto3_client.Client
    unused_wrappers: dict[tuple, Any] = {}
    lock = threading.Lock()

    def shared_client(options):
        key = _s3_settings(options)
        with lock:
            if key not in unused_wrappers:
                unused_wrappers[key] = beams_client(options)   # builds the boto3 client
        return copy.copy(unused_wrappers[key])

    shared_client.shares_boto3_clients = True
    boto3_client.Client = shared_client


def _s3_settings(options) -> tuple:
    """The S3 settings Beam's client is built from, as Beam reads them."""
    if isinstance(options, PipelineOptions):
        s3 = options.view_as(S3Options)
        return tuple(getattr(s3, name) for name in _S3_SETTINGS)
    return tuple(options.get(name) for name in _S3_SETTINGS)


# At import: every process that runs our Beam code imports this module through the
# components (the client, DirectRunner workers, SDK workers on a cluster).
share_s3_clients()
