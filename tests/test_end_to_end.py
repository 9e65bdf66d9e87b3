"""The whole pipeline on a small synthetic CSV with bad rows and a cross-split duplicate.

The session's smoke run (CSV -> examples -> statistics -> anomalies -> augmented ->
transform -> two trained models -> evaluation -> push; tests/pipeline_fixtures.py) that the
tests below inspect, then a re-run that must skip every step.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES
from fer_pipeline.pipeline.dag import STEP_NAMES
from fer_pipeline.pipeline.runner import committed_output, run_pipeline
from fer_pipeline.core.net import free_port
from tests.serving_fixtures import start_server_process

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def pipeline_run(smoke_run) -> dict:
    """The session's smoke run (tests/pipeline_fixtures.py), as the tests below read it."""
    return {"ctx": smoke_run.ctx, "outcomes": smoke_run.outcomes, "work": smoke_run.work,
            "data": smoke_run.data, "rows": smoke_run.rows, "bad_lines": smoke_run.bad_lines,
            "leaked_line": smoke_run.leaked_line}


def _out(run_root: str, step: str) -> Path:
    """The committed output directory of `step` (what every reader uses)."""
    return Path(committed_output(run_root, step))


def _manifest(run_root: str, step: str) -> dict:
    return json.loads((_out(run_root, step) / "manifest.json").read_text())


def test_every_step_ran_and_wrote_a_manifest(pipeline_run):
    # Every step but tune-<model>, which is off unless asked (README "Tuning").
    assert [o.step for o in pipeline_run["outcomes"]] == [
        name for name in STEP_NAMES if not name.startswith("tune-")]
    for outcome in pipeline_run["outcomes"]:
        manifest = json.loads(Path(outcome.uri, "manifest.json").read_text())
        assert manifest["inputs"] and manifest["duration_s"] >= 0
        assert all(a["fingerprint"].startswith("sha256:")
                   for artifacts in manifest["inputs"].values() for a in artifacts)


def test_no_row_is_lost_and_bad_rows_are_quarantined_with_line_numbers(pipeline_run):
    run_root = pipeline_run["ctx"].run_root
    result = _manifest(run_root, "ingest")["result"]
    written = sum(result["rows_written"].values())
    assert result["rows_read"] == pipeline_run["rows"]
    assert result["rows_read"] == written + result["rows_rejected"]
    with open(_out(run_root, "ingest") / "rejected" / "rejected_rows.csv", newline="") as f:
        rejected = {int(r["line_number"]): r["reason"] for r in csv.DictReader(f)}
    for line in pipeline_run["bad_lines"]:
        assert line in rejected, f"bad line {line} was not quarantined"
    assert pipeline_run["leaked_line"] in rejected  # the cross-split duplicate
    assert "duplicate" in rejected[pipeline_run["leaked_line"]]


def test_reports_a_person_can_open(pipeline_run):
    run_root = pipeline_run["ctx"].run_root
    assert "emotion" in (_out(run_root, "statistics") / "statistics.html").read_text()
    assert (_out(run_root, "validate") / "report.txt").exists()
    report = (_out(run_root, "evaluate") / "report.html").read_text()
    assert "data:image/png;base64," in report and "Felicidad" in report


def test_training_split_is_balanced_and_test_split_untouched(pipeline_run):
    run_root = pipeline_run["ctx"].run_root
    augment = _manifest(run_root, "augment")["result"]
    after = augment["counts_after"]
    assert len(set(after.values())) == 1, after  # every class topped up to the largest
    transform = _manifest(run_root, "transform")["result"]
    examples = _manifest(run_root, "ingest")["result"]
    assert transform["counts"]["test"] == examples["rows_written"]["test"]


def test_models_are_trained_evaluated_and_only_blessed_ones_pushed(pipeline_run):
    ctx = pipeline_run["ctx"]
    blessings = json.loads((_out(ctx.run_root, "evaluate") / "blessings.json").read_text())
    evaluation = json.loads((_out(ctx.run_root, "evaluate") / "evaluation.json").read_text())
    assert set(blessings) == {"cnn", "vgg16"}
    # The smoke CNN must learn the synthetic faces well above chance (1/7) and above the
    # majority class (happy, 25 %).
    cnn_accuracy = evaluation["models"]["cnn"]["accuracy"]
    assert cnn_accuracy > 0.35, cnn_accuracy
    for name, blessing in blessings.items():
        assert blessing["reasons"], name
        versions = sorted(p.name for p in Path(ctx.serving_root, name).glob("[0-9]*")) \
            if Path(ctx.serving_root, name).exists() else []
        assert (versions == ["1"]) == blessing["blessed"], (name, versions, blessing)
        if blessing["blessed"]:
            assert Path(ctx.serving_root, name, "1", "saved_model.pb").exists()
    assert Path(ctx.serving_root, "models.config").exists()


def test_rerun_with_unchanged_inputs_skips_every_step(pipeline_run):
    outcomes = run_pipeline(pipeline_run["ctx"])
    assert all(o.skipped for o in outcomes), [(o.step, o.skipped) for o in outcomes]
    # Nothing new was pushed by the skipped re-run.
    serving_root = pipeline_run["ctx"].serving_root
    for name in ("cnn", "vgg16"):
        if Path(serving_root, name).exists():
            assert len(list(Path(serving_root, name).glob("[0-9]*"))) <= 1


def _client(*args: str) -> list:
    out = subprocess.run([os.path.join(BIN, "fer-client"), *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_pushed_models_answer_through_the_serving_protocol(pipeline_run):
    """pipeline -> push -> fer-serve -> fer-client, over gRPC and REST."""
    ctx = pipeline_run["ctx"]
    blessings = json.loads((_out(ctx.run_root, "evaluate") / "blessings.json").read_text())
    served = [name for name, b in blessings.items() if b["blessed"]]
    assert served, "nothing was blessed, so nothing can be served"
    grpc_port, rest_port = free_port(), free_port()
    server = start_server_process(os.path.join(ctx.serving_root, "models.config"),
                                  grpc_port, rest_port, served)
    try:
        common = ["--csv", pipeline_run["data"], "--rows", "4", "--models", ",".join(served)]
        over_grpc = _client("--port", str(grpc_port), *common)
        over_rest = _client("--protocol", "rest", "--port", str(rest_port), *common)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(over_grpc) == 4
    for by_grpc, by_rest in zip(over_grpc, over_rest):
        decision = by_grpc["decision"]
        assert decision["class_name"] in CLASS_NAMES
        assert decision["class_name_es"] == CLASS_NAMES_ES[CLASS_NAMES.index(
            decision["class_name"])]
        assert set(by_grpc["models"]) == set(served)
        for name in served:
            assert by_grpc["models"][name]["version"] in (1, "1")
            grpc_probs = by_grpc["models"][name]["probabilities"]
            rest_probs = by_rest["models"][name]["probabilities"]
            assert abs(sum(grpc_probs.values()) - 1) < 1e-4
            for label, p in grpc_probs.items():
                assert abs(p - rest_probs[label]) < 1e-5
        assert decision == by_rest["decision"]
