"""Step outputs: fingerprints, commit records, the cache (inputs, parameters, code) and ML
Metadata, exercised with small declared steps whose executors write a file."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from fer_pipeline.core.artifacts import (COMMIT_FILE, fingerprint, read_commit,
                                remove_uncommitted)
from fer_pipeline.core.config import load_config
from fer_pipeline.core.contract import MANIFEST_FILE
from fer_pipeline.pipeline.dag import DATA, Step, StepEnv
from fer_pipeline.pipeline.metadata import MetadataStore
from fer_pipeline.pipeline.runner import RunContext, run_step


def _write(inputs, out, env: StepEnv, text: str = "hello"):
    Path(out, "data.txt").write_text(text + open(inputs["data"]).read())
    return {"counts": {"rows": 1}, "outputs": {"data": os.path.join(out, "data.txt")}}


def _step(tmp_path, executor=_write, code=("tests.test_artifacts",), resumable=False,
          parameters=lambda config, env: {"k": config.augment.seed}) -> Step:
    return Step("toy", "toy", {"data": DATA}, {"toy": "", "file": "data.txt"}, executor,
                parameters, code, "a toy step", resumable=resumable)


def _ctx(tmp_path, seed: int = 1, force: bool = False) -> RunContext:
    config = load_config(overrides={"augment": {"seed": seed}})
    return RunContext([str(tmp_path / "input.csv")], str(tmp_path / "run"), config,
                      force=force, run_id="test")


def _run(step, ctx):
    return run_step(step, ctx, MetadataStore(ctx.config.metadata, ctx.run_root, "test"), {})


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "input.csv"
    path.write_text("a,b\n")
    return path


def test_fingerprint_changes_with_content_and_ignores_own_manifest(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("one")
    before = fingerprint(str(d))
    (d / MANIFEST_FILE).write_text("{}")
    assert fingerprint(str(d)) == before
    (d / "a.txt").write_text("two")
    assert fingerprint(str(d)) != before
    with pytest.raises(FileNotFoundError):
        fingerprint(str(tmp_path / "missing"))


def test_step_runs_then_skips_then_reruns_on_input_parameter_or_force(tmp_path, source):
    step = _step(tmp_path)
    first = _run(step, _ctx(tmp_path))
    assert not first.skipped
    record = read_commit(str(tmp_path / "run" / "toy"))
    assert record.uri == first.uri and Path(first.uri, "data.txt").read_text() == "helloa,b\n"
    assert record.output_uri("file") == os.path.join(first.uri, "data.txt")
    assert record.outputs["toy"]["fingerprint"].startswith("sha256:")
    manifest = json.loads(Path(first.uri, MANIFEST_FILE).read_text())
    assert manifest["result"]["outputs"]["data"] == "data.txt"   # relative to its directory
    assert manifest["inputs"]["data"][0]["fingerprint"] == fingerprint(str(source))

    assert _run(step, _ctx(tmp_path)).skipped
    assert not _run(step, _ctx(tmp_path, seed=2)).skipped          # a parameter changed
    source.write_text("a,b\n1,2\n")
    changed = _run(step, _ctx(tmp_path, seed=2))                    # an input changed
    assert not changed.skipped
    forced = _run(step, _ctx(tmp_path, seed=2, force=True))
    assert not forced.skipped and forced.uri != changed.uri         # never overwritten
    # Only the committed execution directory is left.
    assert sorted(os.listdir(tmp_path / "run" / "toy")) == sorted(
        [COMMIT_FILE, os.path.basename(forced.uri)])


def test_editing_the_steps_code_reruns_it(tmp_path, source, monkeypatch):
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "toy_component.py").write_text("VERSION = 1\n")
    monkeypatch.syspath_prepend(str(module_dir))
    step = _step(tmp_path, code=("toy_component",))
    assert not _run(step, _ctx(tmp_path)).skipped
    assert _run(step, _ctx(tmp_path)).skipped
    (module_dir / "toy_component.py").write_text("VERSION = 2  # edited\n")
    importlib.invalidate_caches()
    assert not _run(step, _ctx(tmp_path)).skipped


def test_crashed_step_leaves_the_previous_commit_and_nothing_readers_trust(tmp_path, source):
    good = _run(_step(tmp_path), _ctx(tmp_path))

    def crashing(inputs, out, env):
        _write(inputs, out, env, "half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(_step(tmp_path, executor=crashing), _ctx(tmp_path, seed=2))
    record = read_commit(str(tmp_path / "run" / "toy"))
    assert record.uri == good.uri
    assert Path(record.output_uri("file")).read_text() == "helloa,b\n"
    leftovers = [n for n in os.listdir(tmp_path / "run" / "toy")
                 if n not in (COMMIT_FILE, os.path.basename(good.uri))]
    assert leftovers == []            # a failed attempt is removed when it fails
    # A killed process cannot clean up: its attempt, named by no record, goes next time.
    killed = tmp_path / "run" / "toy" / "x-killed"
    killed.mkdir()
    assert remove_uncommitted(str(tmp_path / "run" / "toy")) == ["x-killed"]

    with pytest.raises(RuntimeError):
        _run(dataclasses.replace(_step(tmp_path, executor=crashing), directory="fresh"),
             _ctx(tmp_path))
    assert read_commit(str(tmp_path / "run" / "fresh")) is None


def test_resumable_step_keeps_what_a_killed_attempt_left(tmp_path, source):
    def killed(inputs, out, env):
        Path(out, "checkpoint").write_text("epoch 1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(_step(tmp_path, executor=killed, resumable=True), _ctx(tmp_path))
    seen = {}

    def resumed(inputs, out, env):
        seen["checkpoint"] = Path(out, "checkpoint").read_text()
        return _write(inputs, out, env)

    _run(_step(tmp_path, executor=resumed, resumable=True), _ctx(tmp_path))
    assert seen["checkpoint"] == "epoch 1"


def test_cache_trusts_ml_metadata_and_records_lineage(tmp_path, source):
    ctx = _ctx(tmp_path)
    first = _run(_step(tmp_path), ctx)
    store = MetadataStore(ctx.config.metadata, ctx.run_root, "test")
    found = store.find_completed("toy", first.commit.cache_key)
    assert found["inputs"]["data"][0]["fingerprint"] == fingerprint(str(source))
    assert found["outputs"]["toy"][0]["uri"] == first.uri
    assert json.loads(found["properties"]["result"])["counts"] == {"rows": 1}
    assert store.run_contexts() == ["fer-pipeline/test"]
    assert [e["step"] for e in store.executions_in_run("fer-pipeline/test")] == ["toy"]
    # Without its ML Metadata record, a committed output is not trusted as a cache hit.
    os.remove(tmp_path / "run" / "metadata.sqlite")
    assert not _run(_step(tmp_path), _ctx(tmp_path)).skipped


def test_a_missing_upstream_output_says_which_step_to_run(tmp_path):
    from fer_pipeline.pipeline.dag import build_steps
    from fer_pipeline.pipeline.runner import PipelineError

    ctx = _ctx(tmp_path)
    transform = next(s for s in build_steps() if s.name == "transform")
    with pytest.raises(PipelineError, match="fer-pipeline augment"):
        _run(transform, ctx)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
