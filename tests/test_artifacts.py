"""Step manifests: fingerprints, skip-when-unchanged, and no half-finished step dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST, fingerprint, read_manifest, run_step


def _write_step(out: str, text: str = "hello") -> dict:
    Path(out, "data.txt").write_text(text)
    return {"counts": {"rows": 1}, "outputs": {"data": str(Path(out, "data.txt"))}}


def test_fingerprint_changes_with_content_and_ignores_own_manifest(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("one")
    before = fingerprint(d)
    (d / MANIFEST).write_text("{}")
    assert fingerprint(d) == before
    (d / "a.txt").write_text("two")
    assert fingerprint(d) != before
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path / "missing")


def test_step_runs_then_skips_then_reruns_on_change(tmp_path):
    source = tmp_path / "input.csv"
    source.write_text("a,b\n")
    step_dir = tmp_path / "run" / "step"
    calls = []

    def body(out):
        calls.append(out)
        return _write_step(out)

    first = run_step("s", step_dir, {"data": str(source)}, {"k": 1}, body)
    assert not first.skipped and len(calls) == 1
    manifest = read_manifest(step_dir)
    assert manifest["result"]["outputs"]["data"] == "data.txt"  # relative to the step dir
    assert manifest["inputs"]["data"]["fingerprint"].startswith("sha256:")
    assert manifest["duration_s"] >= 0

    assert run_step("s", step_dir, {"data": str(source)}, {"k": 1}, body).skipped
    assert len(calls) == 1
    assert not run_step("s", step_dir, {"data": str(source)}, {"k": 2}, body).skipped
    source.write_text("a,b\n1,2\n")
    assert not run_step("s", step_dir, {"data": str(source)}, {"k": 2}, body).skipped
    assert not run_step("s", step_dir, {"data": str(source)}, {"k": 2}, body,
                        force=True).skipped
    assert len(calls) == 4


def test_crashed_step_leaves_previous_result_and_nothing_half_written(tmp_path):
    source = tmp_path / "input.csv"
    source.write_text("x")
    step_dir = tmp_path / "step"
    run_step("s", step_dir, {"data": str(source)}, {}, lambda out: _write_step(out, "good"))

    def crashing(out):
        _write_step(out, "half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_step("s", step_dir, {"data": str(source)}, {"v": 2}, crashing)
    assert (step_dir / "data.txt").read_text() == "good"
    assert json.loads((step_dir / MANIFEST).read_text())["parameters"] == {}

    new_step = tmp_path / "new_step"
    with pytest.raises(RuntimeError):
        run_step("s", new_step, {"data": str(source)}, {}, crashing)
    assert not new_step.exists()


def test_resumable_step_keeps_what_a_killed_attempt_left(tmp_path):
    source = tmp_path / "input.csv"
    source.write_text("x")
    step_dir = tmp_path / "train"

    def killed(out):
        Path(out, "checkpoint").write_text("epoch 1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_step("t", step_dir, {"data": str(source)}, {}, killed, resumable=True)

    seen = {}

    def resumed(out):
        seen["checkpoint"] = Path(out, "checkpoint").read_text()
        return {}

    run_step("t", step_dir, {"data": str(source)}, {}, resumed, resumable=True)
    assert seen["checkpoint"] == "epoch 1"
