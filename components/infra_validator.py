"""InfraValidator: a candidate must load and answer in a real model server before a push.

The evaluation gate says a model is good enough; this step proves it *serves*. For each
candidate the gate blessed, it starts a sandboxed model server in its own process on free
loopback ports, with a temporary models.config naming a copy of the candidate (as version
1) in a temporary directory. The server is `fer-serve --server <config.server>`, so it is
the real `tensorflow_model_server` when that is on PATH and the embedded server otherwise:
the same choice `fer-serve` makes for production (serving/server.py, `tfserving_binary`).

Modes (`infra_validation.mode`):
- `load_only`: the version must become AVAILABLE within `load_timeout_s`.
- `load_and_query` (default): also canary requests built from the test split's first
  `canary_examples` faces go over gRPC to every signature of the export contract
  (serving_default, serving_uint8, serving_examples, explain). Every call must return OK
  with the contract's dtypes and shapes, finite probabilities that sum to 1, and answers
  equal to the in-process SavedModel's within `max_difference` (TFX's InfraValidator only
  checks that the calls succeed).

It measures the load time (server start to AVAILABLE), the first call's latency, the p50
of `latency_requests` serving_uint8 calls and the server's resident memory, and writes an
infra blessing per model (`blessed`, one-line `summary`, `reasons`, `measurements`) to
`infra_blessings.json`. With `warmup` (query mode only, as in TFX), the canary requests are
written into the copy as `assets.extra/tf_serving_warmup_requests`, so the sandbox already
replays them on load, and that copy, byte for byte what the sandbox served, is kept as
`<model>/serving_model/` for the pusher to publish. The server's own log is kept as
`<model>/server.log`; the sandbox's process and temporary directory are gone when the step
returns, whatever happened. `report.html` is the evaluation report with this step's verdict
and measurements added under the gate's (the page to read before a push).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from fer_pipeline.core.report_page import with_infra_section
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import to_jsonable
from fer_pipeline.core.config import InfraValidationConfig
from fer_pipeline.core.contract import (BLESSINGS_FILE, CLASS_NAMES, CLASS_NAMES_FERPLUS,
                               EXAMPLES_PATTERN, INFRA_BLESSINGS_FILE, NUM_CLASSES,
                               OUTPUT_PROBABILITIES, REPORT_HTML, SERVER_LOG_FILE,
                               SERVING_MODEL_DIR, SIGNATURE_UINT8)
from fer_pipeline.core.errors import ConfigError, InputDataError, MissingInputError
from fer_pipeline.core.net import free_port
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.model_manager import STATE_CODES
from fer_pipeline.serving.server import tfserving_binary
from fer_pipeline.serving.warmup import (CONTRACT_SIGNATURES, canary_requests, contract_outputs,
                            request_inputs, write_warmup_requests)

__all__ = ["run_infra_validator", "InfraValidationResult"]

log = logging.getLogger(__name__)

MODES = ("load_only", "load_and_query")
SERVER_CHOICES = ("auto", "embedded", "tfserving")
TEST_SPLIT = "test"
SANDBOX_VERSION = 1
STOP_GRACE_S = 5.0


class InfraFailure(Exception):
    """Why a candidate is held back: one line naming the failure."""


class InfraTimeout(InfraFailure):
    """A canary got no answer in time: the server is stuck, so no further call is sent."""


@dataclass
class ModelInfraValidation:
    blessed: bool
    summary: str                                   # one line for a person
    reasons: list[str] = field(default_factory=list)
    measurements: dict[str, Optional[float]] = field(default_factory=dict)
    server: str = ""                               # which server binary served it
    mode: str = ""
    server_log: str = ""                           # the sandbox server's own log, kept
    validated_model: str = ""                      # what push publishes (when blessed)
    warmup_requests: int = 0


@dataclass
class InfraValidationResult:
    infra_blessings_path: str
    report_path: str                               # the evaluation report plus this verdict
    models: dict[str, ModelInfraValidation]
    summaries: dict[str, str]
    blessed: dict[str, bool]


# ----------------------------------------------------------------------------- the sandbox

def server_name(choice: str) -> str:
    binary = tfserving_binary(choice)
    return f"tensorflow_model_server ({binary})" if binary else "fer-serve (embedded)"


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class Sandbox:
    """One candidate served as version 1 by a model server in its own process.

    Everything lives in one temporary directory (the copy, models.config, the server's
    log); `close()` ends the server's process group and deletes the directory.
    """

    def __init__(self, model: str, candidate_dir: str, server_choice: str,
                 warmup: list[predict_pb2.PredictRequest]) -> None:
        self.model = model
        self.root = tempfile.mkdtemp(prefix=f"fer-infra-{model}-")
        self.process: Optional[subprocess.Popen] = None
        self.channel: Optional[grpc.Channel] = None
        self.log_path = os.path.join(self.root, SERVER_LOG_FILE)
        base_path = os.path.join(self.root, "models", model)
        self.version_dir = os.path.join(base_path, str(SANDBOX_VERSION))
        try:
            fileio.copytree(candidate_dir, self.version_dir)
            if warmup:
                write_warmup_requests(self.version_dir, warmup)
            config_path = write_model_server_config(
                os.path.join(self.root, "models.config"),
                [ModelSpec(name=model, base_path=base_path)])
            self.grpc_port, self.rest_port = free_port(), free_port()
            command = [sys.executable, "-m", "fer_pipeline.serving.server", "--model-config", config_path,
                       "--port", str(self.grpc_port), "--rest-port", str(self.rest_port),
                       "--server", server_choice]
            with open(self.log_path, "w") as server_log:
                self.started = time.monotonic()
                # Its own session: close() can end the server and anything it started.
                self.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=server_log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except BaseException:
            self.close()
            raise
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.models_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def wait_available(self, timeout_s: float) -> float:
        """Seconds from the server's start until version 1 is AVAILABLE."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model
        deadline = self.started + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                detail = _last_line(self.log_path)
                raise InfraFailure(f"the model server exited with {_exit_description(code)} "
                                   f"before {self.model} was AVAILABLE"
                                   + (f": {detail}" if detail else ""))
            try:
                reply = self.models_stub.GetModelStatus(
                    request, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                for status in reply.model_version_status:
                    if status.version != SANDBOX_VERSION:
                        continue
                    if status.state == STATE_CODES["AVAILABLE"]:
                        return time.monotonic() - self.started
                    if status.state == STATE_CODES["END"] and status.status.error_code:
                        raise InfraFailure(f"the model server failed to load {self.model}: "
                                           f"{status.status.error_message.splitlines()[0]}")
            except grpc.RpcError:
                pass  # not listening yet, or the model is still loading
            if time.monotonic() >= deadline:
                raise InfraFailure(f"{self.model} was not AVAILABLE within {timeout_s:g} s "
                                   "of the model server's start")
            time.sleep(0.2)

    def predict(self, request: predict_pb2.PredictRequest,
                timeout_s: float) -> tuple[dict[str, np.ndarray], float]:
        """The outputs of one Predict call and its latency in milliseconds."""
        started = time.perf_counter()
        try:
            reply = self.predictions.Predict(request, timeout=timeout_s)
        except grpc.RpcError as error:
            signature = request.model_spec.signature_name
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise InfraTimeout(f"{signature} did not answer within {timeout_s:g} s")
            raise InfraFailure(f"{signature} answered {error.code().name}: "
                               f"{(error.details() or '').splitlines()[0] if error.details() else ''}")
        latency_ms = (time.perf_counter() - started) * 1000
        return ({key: tf.make_ndarray(proto) for key, proto in reply.outputs.items()},
                latency_ms)

    def resident_bytes(self) -> Optional[int]:
        """The server process's resident memory (VmRSS), None where /proc cannot say."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    def stop_server(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self, keep_log_at: str = "") -> None:
        """Ends the server, keeps its log at `keep_log_at` (if given), deletes the sandbox."""
        try:
            self.stop_server()
            if keep_log_at and os.path.exists(self.log_path):
                fileio.copy_file(self.log_path, keep_log_at)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- checks

def _answer_problems(request: predict_pb2.PredictRequest, outputs: Mapping[str, np.ndarray],
                     config: InfraValidationConfig) -> list[str]:
    """What is wrong with one served answer: missing outputs, dtypes, shapes, probabilities."""
    signature = request.model_spec.signature_name
    batch = len(next(iter(request_inputs(request).values())))
    problems = []
    # A FER+ model answers 8 classes: the contract's shapes follow the model's own width.
    width = np.shape(outputs.get(OUTPUT_PROBABILITIES, ()))[-1:]
    fer_widths = (len(CLASS_NAMES), len(CLASS_NAMES_FERPLUS))
    num_classes = width[0] if width and width[0] in fer_widths else NUM_CLASSES
    for name, spec in contract_outputs(signature, num_classes).items():
        if name not in outputs:
            problems.append(f"{signature} returned no {name!r} output")
            continue
        value = outputs[name]
        expected_shape = (batch, *spec.inner_shape)
        dtype_ok = (value.dtype.kind in "SOU" if spec.dtype == tf.string
                    else value.dtype == spec.dtype.as_numpy_dtype)
        if not dtype_ok:
            problems.append(f"{signature} returned {name} as {value.dtype}, "
                            f"the contract says {spec.dtype.name}")
        if tuple(value.shape) != expected_shape:
            problems.append(f"{signature} returned {name} of shape {list(value.shape)}, "
                            f"expected {list(expected_shape)}")
    probabilities = outputs.get(OUTPUT_PROBABILITIES)
    if probabilities is not None and probabilities.dtype.kind == "f":
        if not np.all(np.isfinite(probabilities)):
            problems.append(f"{signature} returned probabilities that are not finite (NaN/inf)")
        elif probabilities.ndim == 2:
            worst = float(np.max(np.abs(probabilities.sum(axis=1) - 1.0)))
            if worst > config.probability_sum_tolerance:
                problems.append(f"{signature} returned probabilities that sum to 1 only "
                                f"within {worst:.2g}")
    return problems


def _in_process_differences(version_dir: str, requests: list[predict_pb2.PredictRequest],
                            answers: Mapping[str, Mapping[str, np.ndarray]],
                            max_difference: float) -> list[str]:
    """Where the served answers differ from the same SavedModel called in this process."""
    loaded = tf.saved_model.load(version_dir)
    problems = []
    for request in requests:
        signature = request.model_spec.signature_name
        served = answers.get(signature)
        if served is None or signature not in loaded.signatures:
            continue
        inputs = {key: tf.constant(value) for key, value in request_inputs(request).items()}
        expected = {key: value.numpy()
                    for key, value in loaded.signatures[signature](**inputs).items()}
        for name, want in expected.items():
            got = served.get(name)
            if got is None or got.shape != want.shape:
                continue  # already reported by the contract checks
            if want.dtype.kind == "f":
                difference = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
                if difference > max_difference:
                    problems.append(f"{signature} {name} differs from the in-process "
                                    f"SavedModel by {difference:.2g} (allowed "
                                    f"{max_difference:g})")
            elif not np.array_equal(got, want):
                problems.append(f"{signature} {name} differs from the in-process SavedModel")
    return problems


def _query(sandbox: Sandbox, requests: list[predict_pb2.PredictRequest],
           config: InfraValidationConfig) -> tuple[dict[str, dict[str, np.ndarray]],
                                                   list[str], dict[str, float]]:
    """Sends every canary, then the latency probe; returns answers, problems, timings."""
    answers, problems, latencies = {}, [], []
    for request in requests:
        try:
            outputs, latency_ms = sandbox.predict(request, config.request_timeout_s)
        except InfraTimeout:
            raise
        except InfraFailure as failure:
            problems.append(str(failure))
            continue
        latencies.append(latency_ms)
        answers[request.model_spec.signature_name] = outputs
        problems += _answer_problems(request, outputs, config)
    timings = {"first_call_ms": latencies[0] if latencies else None}
    probe = next((r for r in requests if r.model_spec.signature_name == SIGNATURE_UINT8),
                 requests[0])
    if not problems:
        probes = [sandbox.predict(probe, config.request_timeout_s)[1]
                  for _ in range(config.latency_requests)]
        timings["p50_ms"] = float(np.median(probes)) if probes else None
    return answers, problems, timings


# ----------------------------------------------------------------------------- one model

def _validate(name: str, candidate_dir: str, canaries: list[bytes], output_dir: str,
              config: InfraValidationConfig) -> ModelInfraValidation:
    query = config.mode == "load_and_query"
    requests = (canary_requests(name, canaries, CONTRACT_SIGNATURES, config.explain_examples)
                if query else [])
    warmup = requests if query and config.warmup else []
    server_log = fileio.join(output_dir, name, SERVER_LOG_FILE)
    outcome = ModelInfraValidation(blessed=False, summary="", server=server_name(config.server),
                                   mode=config.mode, server_log=server_log)
    sandbox = Sandbox(name, candidate_dir, config.server, warmup)
    try:
        measurements: dict[str, Optional[float]] = {
            "load_seconds": sandbox.wait_available(config.load_timeout_s)}
        answers, problems = {}, []
        if query:
            answers, problems, timings = _query(sandbox, requests, config)
            measurements.update(timings)
        measurements["server_rss_bytes"] = sandbox.resident_bytes()
        sandbox.stop_server()
        if query and not problems:
            problems = _in_process_differences(sandbox.version_dir, requests, answers,
                                               config.max_difference)
        if problems:
            raise InfraFailure("; ".join(problems))
        outcome.validated_model = fileio.join(output_dir, name, SERVING_MODEL_DIR)
        fileio.copytree(sandbox.version_dir, outcome.validated_model)
        outcome.blessed, outcome.measurements = True, measurements
        outcome.warmup_requests = len(warmup)
        outcome.reasons = [f"AVAILABLE in {measurements['load_seconds']:.1f} s"] + (
            [f"{len(requests)} canary requests answered as the in-process SavedModel "
             f"({', '.join(r.model_spec.signature_name for r in requests)})"] if query else [])
        outcome.summary = _blessed_summary(name, outcome, measurements, len(requests))
    except InfraFailure as failure:
        outcome.reasons = [str(failure)]
        outcome.summary = (f"{name} held back by infra validation: {failure} (the model "
                           f"server's own log: {server_log})")
    finally:
        sandbox.close(keep_log_at=server_log)
    # INFO, like the gate's verdict: `fer-pipeline run` prints the summary once.
    log.info("%s%s", outcome.summary,
             f" (the model server's own log: {server_log})" if outcome.blessed else "")
    return outcome


def _blessed_summary(name: str, outcome: ModelInfraValidation,
                     measurements: Mapping[str, Optional[float]], signatures: int) -> str:
    server = outcome.server.split(" (")[0]
    rss = measurements.get("server_rss_bytes")
    memory = f", {rss / 2**20:.0f} MiB resident" if rss else ""
    if outcome.mode == "load_only":
        return (f"{name} infra-blessed (load_only): {server} loaded it in "
                f"{measurements['load_seconds']:.1f} s{memory}")
    return (f"{name} infra-blessed: {server} loaded it in {measurements['load_seconds']:.1f} s; "
            f"{signatures} signatures answered as the in-process model "
            f"(first call {measurements['first_call_ms']:.0f} ms, "
            f"p50 {measurements.get('p50_ms') or 0:.1f} ms{memory})")


# ----------------------------------------------------------------------------- entry point

def read_canary_examples(examples_dir: str, count: int) -> list[bytes]:
    """The first `count` serialized raw examples of the test split."""
    fileio.register_filesystem(examples_dir)
    files = sorted(fileio.glob(fileio.join(examples_dir, TEST_SPLIT, EXAMPLES_PATTERN)))
    if not files:
        raise MissingInputError(f"no test TFRecords under {examples_dir}/{TEST_SPLIT}")
    records = list(tf.data.TFRecordDataset(files).take(count).as_numpy_iterator())
    if not records:
        raise InputDataError(f"the test split under {examples_dir}/{TEST_SPLIT} is empty: "
                             "no canary requests can be built")
    return records


def _write_report(evaluation_dir: str, output_dir: str,
                  infra_blessings: Mapping[str, Mapping[str, Any]]) -> str:
    """The evaluation report with both verdicts: the gate's and this step's ("" when the
    evaluator wrote no report)."""
    source = fileio.join(evaluation_dir, REPORT_HTML)
    if not fileio.exists(source):
        return ""
    target = fileio.join(output_dir, REPORT_HTML)
    fileio.write_text(target, with_infra_section(fileio.read_text(source), infra_blessings))
    return target


def _check_config(config: InfraValidationConfig) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"infra_validation.mode must be one of {list(MODES)}, "
                          f"got {config.mode!r}")
    if config.server not in SERVER_CHOICES:
        raise ConfigError(f"infra_validation.server must be one of {list(SERVER_CHOICES)}, "
                          f"got {config.server!r}")
    if config.canary_examples < 1 or config.explain_examples < 1:
        raise ConfigError("infra_validation.canary_examples and explain_examples must be >= 1")


def run_infra_validator(examples_dir: str, model_dirs: Mapping[str, str], evaluation_dir: str,
                        output_dir: str, config: InfraValidationConfig) -> InfraValidationResult:
    """Serves each candidate the evaluator blessed in a sandbox and writes the infra
    blessings (`output_dir/infra_blessings.json`); see the module docstring.

    `model_dirs` maps model name to its trainer output directory (holding serving_model/).
    """
    _check_config(config)
    blessings_path = fileio.join(evaluation_dir, BLESSINGS_FILE)
    if not fileio.exists(blessings_path):
        raise MissingInputError(f"{blessings_path} not found: run the evaluator first")
    blessings = fileio.read_json(blessings_path)
    fileio.makedirs(output_dir)
    canaries: list[bytes] = []
    outcomes: dict[str, ModelInfraValidation] = {}
    for name, model_dir in sorted(model_dirs.items()):
        if not (blessings.get(name) or {}).get("blessed", False):
            outcomes[name] = ModelInfraValidation(
                blessed=False, mode=config.mode, reasons=["not blessed by the evaluator"],
                summary=f"{name} not infra-validated: the evaluation gate held it back")
            continue
        if config.mode == "load_and_query" and not canaries:
            canaries = read_canary_examples(examples_dir, config.canary_examples)
        candidate = fileio.join(model_dir, SERVING_MODEL_DIR)
        outcomes[name] = _validate(name, candidate, canaries, output_dir, config)
    path = fileio.join(output_dir, INFRA_BLESSINGS_FILE)
    fileio.write_json(path, outcomes)
    report = _write_report(evaluation_dir, output_dir, to_jsonable(outcomes))
    return InfraValidationResult(
        infra_blessings_path=path, report_path=report, models=outcomes,
        summaries={name: o.summary for name, o in outcomes.items()},
        blessed={name: o.blessed for name, o in outcomes.items()})

