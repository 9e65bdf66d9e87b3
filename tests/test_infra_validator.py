"""The infra-validate step: candidates served by a sandboxed fer-serve and queried over gRPC.

Tiny contract models (tests/serving_fixtures.py), not trained ones: a good candidate is
blessed in both modes and carries its warm-up requests; broken ones (corrupted variables,
wrong shape and NaN answers, a server stuck past the timeout, a port taken, a server binary
that crashes) are held back with one line naming the failure, nothing is pushed, the served
version stays, and no sandbox process or temporary file is left behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components import infra_validator
from fer_pipeline.components.infra_validator import run_infra_validator
from fer_pipeline.components.pusher import run_pusher, served_versions, write_serving_config
from fer_pipeline.pipeline.cli import _closing_lines
from fer_pipeline.core.config import InfraValidationConfig, PushConfig
from fer_pipeline.core.contract import (BLESSINGS_FILE, INFRA_BLESSINGS_FILE, NUM_CLASSES, NUM_PIXELS,
                               OUTPUT_SALIENCY, SERVER_LOG_FILE, SERVING_MODEL_DIR)
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from fer_pipeline.serving.model_manager import LoadedVersion, ModelManager
from fer_pipeline.serving.warmup import (CONTRACT_SIGNATURES, canary_requests, read_warmup_requests,
                            request_inputs, write_warmup_requests)
from tests.serving_fixtures import (TinyFerModel, example_bytes, push_version, random_images,
                                    save_tiny_model)


class ContractModel(TinyFerModel):
    """The tiny contract model with its weights in a variable and an `explain` signature,
    so it exports all four signatures of the trained models. `fault` breaks it:
    "nan" (NaN probabilities from serving_examples), "shape" (6 probabilities from
    serving_uint8), "stuck" (every call spins far past any timeout)."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, fault: str = "") -> None:
        super().__init__(weights, bias)
        self.weights = tf.Variable(weights, dtype=tf.float32)
        self.fault = fault

    def _outputs(self, pixels):
        outputs = super()._outputs(pixels)
        if "stuck" in self.fault:
            spin = tf.while_loop(lambda i: i < 10**13, lambda i: i + 1,
                                 [tf.constant(0, tf.int64)])
            outputs["probabilities"] += tf.cast(tf.minimum(spin, 0), tf.float32)
        return outputs

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="pixels")])
    def serve_uint8(self, pixels):
        outputs = self._outputs(pixels)
        if "shape" in self.fault:
            outputs["probabilities"] = outputs["probabilities"][:, :6]
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        parsed = tf.io.parse_example(
            examples, {"pixels": tf.io.FixedLenFeature([], tf.string)})
        outputs = self._outputs(tf.io.decode_raw(parsed["pixels"], tf.uint8))
        if "nan" in self.fault:
            outputs["probabilities"] *= float("nan")
        return outputs

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="pixels")])
    def explain(self, pixels):
        outputs = self._outputs(pixels)
        batch = tf.shape(outputs["probabilities"])[0]
        outputs[OUTPUT_SALIENCY] = tf.zeros([batch, NUM_CLASSES, 48, 48])
        return outputs


def save_candidate(model_dir: Path, fault: str = "", seed: int = 0) -> str:
    """A trainer-shaped output directory: `<model_dir>/serving_model/` with four signatures."""
    weights = np.random.default_rng(seed).normal(0, 0.05, (NUM_PIXELS, NUM_CLASSES))
    module = ContractModel(weights, np.zeros(NUM_CLASSES), fault)
    tf.saved_model.save(module, str(model_dir / SERVING_MODEL_DIR), signatures={
        "serving_default": module.serve_int32.get_concrete_function(),
        "serving_uint8": module.serve_uint8.get_concrete_function(),
        "serving_examples": module.serve_examples.get_concrete_function(),
        "explain": module.explain.get_concrete_function()})
    return str(model_dir)


def corrupt_variables(model_dir: str) -> None:
    variables = Path(model_dir, SERVING_MODEL_DIR, "variables")
    for data in variables.glob("variables.data-*"):
        data.write_bytes(b"\x00not a checkpoint shard" * 64)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A test split of 6 faces, one good candidate, and an evaluator that blessed cnn."""
    root = tmp_path_factory.mktemp("infra")
    test_split = root / "examples" / "test"
    test_split.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(test_split / "examples-00000-of-00001.tfrecord")) as out:
        for image in random_images(6, seed=3):
            out.write(example_bytes(image))
    evaluation = root / "evaluation"
    evaluation.mkdir()
    (evaluation / BLESSINGS_FILE).write_text(json.dumps(
        {"cnn": {"blessed": True, "reasons": ["accuracy passed"], "summary": "cnn blessed"}}))
    (evaluation / "report.html").write_text(
        '<html><body><section class="banner ok" id="verdict"><h2>Verdict</h2></section>'
        '<h2>Test data</h2></body></html>')
    return {"examples": str(root / "examples"), "evaluation": str(evaluation),
            "good": save_candidate(root / "good")}


@pytest.fixture
def sandbox_tmp(tmp_path, monkeypatch) -> Path:
    """Where the sandboxes make their temporary directories in this test (must end empty)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def _sandbox_processes(scratch: Path) -> list[int]:
    """Processes whose command line names a sandbox under `scratch` (the servers')."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(scratch).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_load_and_query_blesses_a_good_candidate_with_its_warmup(inputs, tmp_path, sandbox_tmp):
    out = tmp_path / "infra"
    result = run_infra_validator(inputs["examples"], {"cnn": inputs["good"]},
                                 inputs["evaluation"], str(out), InfraValidationConfig())
    cnn = result.models["cnn"]
    assert cnn.blessed, cnn.summary
    assert cnn.summary.startswith("cnn infra-blessed: fer-serve loaded it in ")
    assert "4 signatures answered as the in-process model" in cnn.summary
    measured = cnn.measurements
    assert 0 < measured["load_seconds"] < 180
    assert measured["first_call_ms"] > 0 and measured["p50_ms"] > 0
    assert measured["server_rss_bytes"] > 50 * 2**20      # a TF process, not a stub
    # The validated copy holds the canaries as TF Serving's warm-up file, one per signature.
    warmup = read_warmup_requests(str(out / "cnn" / SERVING_MODEL_DIR))
    assert [r.model_spec.signature_name for r in warmup] == list(CONTRACT_SIGNATURES)
    assert cnn.warmup_requests == 4
    # ...and the server's log shows it replayed them before serving.
    assert "warmed up cnn version 1 with 4 requests" in (out / "cnn" / SERVER_LOG_FILE).read_text()
    written = json.loads((out / INFRA_BLESSINGS_FILE).read_text())
    assert written["cnn"]["blessed"] and written["cnn"]["summary"] == cnn.summary
    # The report: the gate's verdict, then this one, then the rest of the evaluation.
    report = (out / "report.html").read_text()
    assert report.index('id="verdict"') < report.index('id="infra-validation"') \
        < report.index("Test data")
    assert 'data-model="cnn" data-blessed="true"><b>INFRA-BLESSED' in report
    assert list(sandbox_tmp.iterdir()) == [] and _sandbox_processes(sandbox_tmp) == []
    # Push publishes the validated copy, warm-up included.
    serving = tmp_path / "serving"
    push = run_pusher({"cnn": inputs["good"]}, inputs["evaluation"], str(out), str(serving),
                      str(tmp_path / "push"), PushConfig())
    assert push.models["cnn"].pushed, push.models["cnn"].reasons
    assert push.models["cnn"].reasons[-1] == cnn.summary
    assert len(read_warmup_requests(str(serving / "cnn" / "1"))) == 4


def test_load_only_does_not_query_and_writes_no_warmup(inputs, tmp_path, sandbox_tmp):
    out = tmp_path / "infra"
    result = run_infra_validator(inputs["examples"], {"cnn": inputs["good"]},
                                 inputs["evaluation"], str(out),
                                 InfraValidationConfig(mode="load_only"))
    cnn = result.models["cnn"]
    assert cnn.blessed and "(load_only)" in cnn.summary, cnn.summary
    assert "first_call_ms" not in cnn.measurements and cnn.measurements["load_seconds"] > 0
    assert read_warmup_requests(str(out / "cnn" / SERVING_MODEL_DIR)) == []
    assert list(sandbox_tmp.iterdir()) == []


def test_answers_that_differ_from_the_in_process_model_are_found(inputs):
    """The check beyond TFX: a served answer 1e-3 away from the same SavedModel called in
    process (a server that computes differently) is a problem naming signature and output."""
    version_dir = os.path.join(inputs["good"], SERVING_MODEL_DIR)
    canaries = infra_validator.read_canary_examples(inputs["examples"], 2)
    requests = canary_requests("cnn", canaries, CONTRACT_SIGNATURES)
    loaded = tf.saved_model.load(version_dir)
    answers = {}
    for request in requests:
        signature = request.model_spec.signature_name
        call = loaded.signatures[signature]
        answers[signature] = {k: v.numpy() for k, v in call(**{
            k: tf.constant(v) for k, v in request_inputs(request).items()}).items()}
    differences = infra_validator._in_process_differences
    assert differences(version_dir, requests, answers, 1e-5) == []
    answers["serving_uint8"]["probabilities"] = answers["serving_uint8"]["probabilities"] + 1e-3
    [problem] = differences(version_dir, requests, answers, 1e-5)
    assert problem.startswith("serving_uint8 probabilities differs from the in-process "
                              "SavedModel by 0.001")


def test_a_model_the_gate_held_back_is_not_served(inputs, tmp_path, sandbox_tmp):
    result = run_infra_validator(inputs["examples"], {"vgg16": inputs["good"]},
                                 inputs["evaluation"], str(tmp_path / "infra"),
                                 InfraValidationConfig())
    assert not result.models["vgg16"].blessed
    assert "evaluation gate held it back" in result.summaries["vgg16"]


def test_an_unknown_mode_is_one_clear_error(inputs, tmp_path):
    with pytest.raises(ValueError, match="infra_validation.mode must be one of"):
        run_infra_validator(inputs["examples"], {"cnn": inputs["good"]}, inputs["evaluation"],
                            str(tmp_path / "infra"), InfraValidationConfig(mode="load"))


def _hold_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


BROKEN = {
    # name: (fault in the model, config changes, words the one-line reason must contain)
    "corrupted variables": ("corrupt", {}, ["failed to load cnn"]),
    "wrong shape and NaN": ("shape+nan", {},
                            ["serving_uint8 returned probabilities of shape [4, 6], "
                             "expected [4, 7]", "serving_examples returned probabilities "
                             "that are not finite"]),
    "server past the timeout": ("stuck", {"warmup": False, "request_timeout_s": 2.0},
                                ["serving_default did not answer within 2 s"]),
    "port taken": ("port", {}, ["the model server exited with status 1",
                                "already in use"]),
    "binary crashes": ("crash", {"server": "auto"},
                       ["the model server exited with signal SIGSEGV"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_candidate_is_held_back_and_nothing_is_pushed(case, inputs, tmp_path,
                                                               sandbox_tmp, monkeypatch, caplog):
    fault, changes, words = BROKEN[case]
    # shape+nan: both faults in one candidate, so one server start tests both.
    model_dir = save_candidate(tmp_path / "candidate",
                               fault if fault in ("stuck", "shape+nan") else "", seed=1)
    if fault == "corrupt":
        corrupt_variables(model_dir)
    if fault == "port":
        holder = _hold_port()
        taken = holder.getsockname()[1]
        ports = iter([infra_validator.free_port(), taken])
        monkeypatch.setattr(infra_validator, "free_port", lambda: next(ports))
    if fault == "crash":
        # A tensorflow_model_server on PATH that dies at start: fer-serve --server auto
        # execs it, exactly as it would exec the real one.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "tensorflow_model_server"
        fake.write_text("#!/bin/sh\necho 'tensorflow_model_server: starting' >&2\nkill -SEGV $$\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    # Version 1 is in serving; the broken candidate must not replace it.
    serving = tmp_path / "serving"
    push_version(str(serving / "cnn"), 1, str(Path(inputs["good"], SERVING_MODEL_DIR)))
    write_serving_config(str(serving))
    out = tmp_path / "infra"
    caplog.set_level(logging.INFO, logger="fer_pipeline.components.infra_validator")
    try:
        result = run_infra_validator(inputs["examples"], {"cnn": model_dir},
                                     inputs["evaluation"], str(out),
                                     InfraValidationConfig(**changes))
    finally:
        if fault == "port":
            holder.close()
    cnn = result.models["cnn"]
    assert not cnn.blessed
    assert cnn.summary.startswith("cnn held back by infra validation: ")
    assert "\n" not in cnn.summary
    for word in words:
        assert word in cnn.summary, (word, cnn.summary)
    # The step's log says where the server's own log is, and that log was kept.
    server_log = out / "cnn" / SERVER_LOG_FILE
    assert str(server_log) in caplog.text
    assert server_log.read_text().strip()
    assert not (out / "cnn" / SERVING_MODEL_DIR).exists()
    # Nothing is pushed; the served version stays.
    push = run_pusher({"cnn": model_dir}, inputs["evaluation"], str(out), str(serving),
                      str(tmp_path / "push"), PushConfig())
    assert not push.models["cnn"].pushed
    assert push.models["cnn"].reasons[0] == "not infra-blessed"
    assert served_versions(str(serving), "cnn") == [1]
    # No sandbox process or temporary file survives.
    assert _sandbox_processes(sandbox_tmp) == []
    assert list(sandbox_tmp.iterdir()) == []



def test_fer_serve_replays_warmup_before_a_version_is_available(tmp_path, monkeypatch):
    """serving/model_manager.py: a new version answers its warm-up requests while LOADING,
    the old version serving meanwhile; a failing warm-up request fails the load."""
    template = save_tiny_model(str(tmp_path / "template"))
    base = tmp_path / "serving" / "cnn"
    push_version(str(base), 1, template)
    config = write_model_server_config(str(tmp_path / "serving" / "models.config"),
                                       [ModelSpec(name="cnn", base_path=str(base))])
    manager = ModelManager(config, poll_seconds=3600)
    manager.sync()
    examples = [example_bytes(image) for image in random_images(2, seed=4)]
    signatures = ("serving_default", "serving_uint8", "serving_examples")

    def push_with_warmup(version: int, requests) -> None:
        staging = tmp_path / f"staging-{version}"
        shutil.copytree(template, staging)
        write_warmup_requests(str(staging), requests)
        staging.rename(base / str(version))

    seen = []
    run = LoadedVersion.run

    def watched_run(self, signature, inputs):
        if self.version == 2:   # what a client would get while version 2 warms up
            seen.append((signature, manager.status("cnn", 2)[0].state,
                         manager.resolve("cnn").version))
        return run(self, signature, inputs)

    monkeypatch.setattr(LoadedVersion, "run", watched_run)
    push_with_warmup(2, canary_requests("cnn", examples, signatures))
    manager.sync()
    assert seen == [(s, "LOADING", 1) for s in signatures]
    assert manager.status("cnn", 2)[0].state == "AVAILABLE"
    assert manager.resolve("cnn").version == 2
    # A warm-up request the version cannot answer (it has no `explain`) fails its load.
    push_with_warmup(3, canary_requests("cnn", examples, ("explain",)))
    manager.sync()
    status = manager.status("cnn", 3)[0]
    assert status.state == "END" and "warm-up request 1 of 1 (explain) failed" in \
        status.error_message, status


def test_the_run_commands_closing_lines_show_the_infra_verdict():
    infra = "cnn infra-blessed: fer-serve loaded it in 9.0 s; ..."
    assert _closing_lines("cnn", {"pushed": True, "version": 2, "reasons": ["ok", infra]},
                          "cnn blessed: ...", infra) == [infra, "cnn: pushed as version 2"]
    held = "cnn held back by infra validation: explain answered INTERNAL: boom (the model ...)"
    assert _closing_lines("cnn", {"pushed": False, "reasons": ["not infra-blessed", "x"]},
                          "cnn blessed: ...", held) == [held]
    gate = "vgg16 held back: test accuracy 0.02 does not beat the majority-class baseline"
    assert _closing_lines("vgg16", {"pushed": False, "reasons": ["not blessed", "low"]}, gate,
                          "vgg16 not infra-validated: the evaluation gate held it back") == [gate]
