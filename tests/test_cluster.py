"""The same pipeline locally, as a Kubeflow pipeline, and on an object store.

One local reference run (a 700-row synthetic CSV, one short epoch per model, a gate that
blesses any model so both reach the serving directory) is compared with:
- the Kubeflow Pipelines v2 definition compiled from the same declaration and run with
  kfp.local's SubprocessRunner,
- the whole pipeline with its run root and serving root on s3:// (a real S3-compatible
  server on 127.0.0.1, see tests/object_store.py).
"Equal" means: the same committed ingest/transform outputs (content fingerprints) and
pushed models that give identical probabilities on the test faces. The gate itself is
tested in tests/test_evaluator.py; here it only has to let both models through.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import fingerprint, read_commit
from fer_pipeline.core.config import MODEL_NAMES, load_config
from fer_pipeline.core.contract import EVALUATION_FILE, PUSH_FILE
from fer_pipeline.pipeline.dag import build_steps, step_by_name
from fer_pipeline.pipeline.runner import RunContext, committed_output, run_pipeline

BIN = os.path.dirname(sys.executable)
ROWS = 700
OVERRIDES = {
    "train": {"models": {"cnn": {"epochs": 1, "max_train_examples": 256},
                         "vgg16": {"epochs": 1, "max_train_examples": 32}}},
    "evaluation": {"min_accuracy": {m: 0.0 for m in MODEL_NAMES}, "baseline_margin": -1.0},
}
# Outputs that must be byte-identical wherever the pipeline ran. The transform is compared
# by its statistics (TFT's full-pass mean and variance are float sums whose order follows
# how Beam reads the shards) and the models by what they compute (a SavedModel's graph file
# carries per-save identifiers).
DETERMINISTIC_OUTPUTS = ("ingest.examples", "augment.augmented")


def _config():
    return load_config(profile="smoke", overrides=OVERRIDES)


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cluster_data") / "fer.csv")
    generate_csv(path, rows=ROWS, seed=3)
    return path


@pytest.fixture(scope="module")
def reference_run(data_csv, tmp_path_factory) -> str:
    run_root = str(tmp_path_factory.mktemp("cluster") / "local_run")
    run_pipeline(RunContext([data_csv], run_root, _config(), run_id="reference"))
    return run_root


def _test_faces(run_root: str) -> np.ndarray:
    from fer_pipeline.components.evaluator import load_test_split

    return load_test_split(committed_output(run_root, "ingest.examples")).pixels


def _probabilities(model_dir: str, faces: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    fileio.register_filesystem(model_dir)
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    return serve(pixels=tf.constant(faces.astype("int32")))["probabilities"].numpy()


def _pushed(serving_root: str, model: str) -> str:
    versions = sorted(int(v) for v in fileio.listdir(fileio.join(serving_root, model))
                      if v.isdigit())
    return fileio.join(serving_root, model, str(versions[-1]))


def _assert_same_models(serving_root: str, reference_root: str, faces: np.ndarray,
                        models: tuple[str, ...]) -> None:
    for model in models:
        got = _probabilities(_pushed(serving_root, model), faces)
        want = _probabilities(_pushed(reference_root, model), faces)
        np.testing.assert_array_equal(got, want, err_msg=f"{model} differs")


# ----------------------------------------------------------------------------- local

def test_reference_run_pushes_both_models_and_a_rerun_skips_everything(reference_run,
                                                                        data_csv, capsys):
    push = json.loads(Path(committed_output(reference_run, "push"), PUSH_FILE).read_text())
    assert {m: push["models"][m]["pushed"] for m in MODEL_NAMES} == {m: True for m in MODEL_NAMES}
    outcomes = run_pipeline(RunContext([data_csv], reference_run, _config(), run_id="again"))
    assert [o.skipped for o in outcomes] == [True] * len(outcomes)


def test_editing_a_models_code_retrains_only_what_depends_on_it(reference_run, data_csv,
                                                                monkeypatch):
    import fer_pipeline.pipeline.runner as runner

    original = runner.code_fingerprint

    def edited(modules):
        salt = "+edited" if "fer_pipeline.components.trainer.models" in modules else ""
        return original(modules) + salt

    monkeypatch.setattr(runner, "code_fingerprint", edited)
    ctx = RunContext([data_csv], reference_run, _config(), models=("cnn",), run_id="edit")
    outcomes = {o.step: o.skipped for o in run_pipeline(
        ctx, ["ingest", "augment", "statistics", "validate", "transform", "train-cnn"])}
    assert outcomes == {"ingest": True, "augment": True, "statistics": True,
                        "validate": True, "transform": True, "train-cnn": False}


def test_lineage_of_a_served_version(reference_run, data_csv):
    out = subprocess.run([f"{BIN}/fer-pipeline", "lineage", "--output", reference_run,
                          "--model", "cnn", "--version", "1", "--json"],
                         capture_output=True, text=True, check=True).stdout
    [found] = json.loads(out)
    evaluation = json.loads(Path(committed_output(reference_run, "evaluate"),
                                 EVALUATION_FILE).read_text())
    ingest = read_commit(os.path.join(reference_run, "examples"))
    assert found["data"] == [{"uri": os.path.abspath(data_csv),
                              "fingerprint": fingerprint(data_csv)}]
    assert found["rows_rejected"] == ingest.manifest["result"]["rows_rejected"] == 0
    assert found["validation"]["result"]["blocking"] is False
    assert found["transform"]["execution_dir"] == committed_output(reference_run, "transform")
    assert found["metrics"]["accuracy"] == pytest.approx(
        evaluation["models"]["cnn"]["accuracy"])
    assert found["blessing"]["blessed"] is True
    assert found["infra_blessing"]["blessed"] is True   # served by a sandbox before the push
    assert found["infra_blessing"]["measurements"]["load_seconds"] > 0
    assert found["served_path"] == os.path.join(reference_run, "serving_models", "cnn", "1")
    assert found["fingerprint"] == fingerprint(found["served_path"])

    text = subprocess.run([f"{BIN}/fer-pipeline", "lineage", "--output", reference_run],
                          capture_output=True, text=True, check=True).stdout
    assert "cnn version 1" in text and "vgg16 version 1" in text
    assert fingerprint(data_csv) in text and "blessed" in text
    missing = subprocess.run([f"{BIN}/fer-pipeline", "lineage", "--output", reference_run,
                              "--model", "cnn", "--version", "7"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no pushed version 7" in missing.stderr


def test_the_readme_commands_for_one_step_path_and_dag(reference_run):
    def cli(*args):
        return subprocess.run([f"{BIN}/fer-pipeline", *args], capture_output=True, text=True)

    # One step alone. The first call may re-train (an earlier test committed a CNN under
    # an edited code fingerprint); the second finds its own commit and skips.
    args = ("train", "--model", "cnn", "--output", reference_run, "--profile", "smoke",
            "--config", _config_file(reference_run))
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "train-cnn" in first.stdout and "vgg16" not in first.stdout
    again = cli(*args)
    assert "train-cnn    skipped (unchanged)" in again.stdout, again.stdout + again.stderr
    path = cli("path", "--output", reference_run, "train-cnn.serving_model")
    assert path.stdout.strip() == committed_output(reference_run, "train-cnn.serving_model")
    assert cli("path", "--output", reference_run, "nope").returncode == 2
    from fer_pipeline.pipeline.dag import mermaid

    assert cli("dag", "--mermaid").stdout == mermaid(build_steps())


def _config_file(run_root: str) -> str:
    path = os.path.join(os.path.dirname(run_root), "overrides.yaml")
    Path(path).write_text(yaml.safe_dump(OVERRIDES))
    return path


def test_several_data_files_through_the_runner(data_csv, tmp_path):
    """`--data A --data B`: one ingest over both, each file fingerprinted as an input."""
    second = str(tmp_path / "more.csv")
    generate_csv(second, rows=70, seed=9)
    ctx = RunContext([data_csv, second], str(tmp_path / "run"), _config(), run_id="two")
    [outcome] = run_pipeline(ctx, ["ingest"])
    result = outcome.manifest["result"]
    assert result["rows_read"] == ROWS + 70
    assert [s["path"] for s in result["sources"]] == [data_csv, second]
    assert [a["fingerprint"] for a in outcome.manifest["inputs"]["data"]] == [
        fingerprint(data_csv), fingerprint(second)]


# ----------------------------------------------------------------------------- Kubeflow

def test_compiled_kfp_pipeline_passes_beam_options_to_the_data_steps_only(tmp_path):
    path = str(tmp_path / "pipeline.yaml")
    result = subprocess.run(
        [f"{BIN}/fer-pipeline", "compile", "--kfp", path, "--runner=DataflowRunner",
         "--project=p", "--region=r", "--temp_location=gs://b/tmp"],
        capture_output=True, text=True, check=True)
    assert path in result.stdout
    spec = yaml.safe_load(Path(path).read_text())
    default = spec["root"]["inputDefinitions"]["parameters"]["beam_args_json"]["defaultValue"]
    assert json.loads(default) == ["--runner=DataflowRunner", "--project=p", "--region=r",
                                   "--temp_location=gs://b/tmp"]
    tasks = spec["root"]["dag"]["tasks"]
    # tune-<model> is off unless asked (compile --tune), and so is train's input from it.
    compiled = [step for step in build_steps() if step.is_enabled(load_config())]
    assert sorted(tasks) == sorted(step.name for step in compiled)
    for step in compiled:
        task = tasks[step.name]
        beam = task["inputs"]["parameters"]["beam_args_json"]
        if step.beam:
            assert beam == {"componentInputParameter": "beam_args_json"}, step.name
        else:
            assert beam == {"runtimeValue": {"constant": "[]"}}, step.name
        upstream = set(task.get("dependentTasks", []))
        assert upstream == set(step.upstream()) & set(tasks), step.name


def test_kfp_local_run_pushes_the_same_models_as_the_local_runner(reference_run, data_csv,
                                                                   tmp_path):
    from kfp import local
    from kfp.components import load_component_from_file

    from fer_pipeline.pipeline.kfp_pipeline import compile_pipeline

    # The CNN alone: every component runs in its own process, and VGG16's training, export
    # and infra validation would add minutes without any KFP code path the CNN does not take
    # (the per-model tasks come from one loop over the registry; the compiled DAG of both
    # models is checked in test_compiled_kfp_pipeline_passes_beam_options_...).
    path = compile_pipeline(str(tmp_path / "pipeline.yaml"), config=_config(), models=("cnn",))
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp_root"))
    serving = str(tmp_path / "serving")
    metadata_db = str(tmp_path / "metadata.sqlite")
    load_component_from_file(path)(data=json.dumps([data_csv]), serving_root=serving,
                                   metadata_db=metadata_db)
    _assert_same_models(serving, os.path.join(reference_run, "serving_models"),
                        _test_faces(reference_run), models=("cnn",))
    # The components recorded their executions: lineage works for the KFP run too.
    out = subprocess.run([f"{BIN}/fer-pipeline", "lineage", "--output", str(tmp_path),
                          "--metadata-db", metadata_db, "--model", "cnn", "--json"],
                         capture_output=True, text=True, check=True).stdout
    [found] = json.loads(out)
    assert found["data"][0]["fingerprint"] == fingerprint(data_csv)
    assert found["served_path"] == os.path.join(serving, "cnn", "1")


# ----------------------------------------------------------------------------- object store

def test_whole_pipeline_on_s3_equals_the_local_run(reference_run, data_csv, s3, tmp_path):
    """Every step, ingest through push, with the run root and serving root on s3://.

    One model (the CNN): VGG16's run directory is ~540 MB of SavedModel and checkpoints,
    and pushing that through moto's in-memory Python server would take most of the
    suite's time budget without exercising any other code path.
    """
    run_root, serving_root = s3.unique_uri("pipeline-run"), s3.unique_uri("pipeline-serving")
    config = load_config(profile="smoke", overrides={
        **OVERRIDES, "push": {"serving_root": serving_root},
        "metadata": {"sqlite_path": str(tmp_path / "metadata.sqlite")}})
    outcomes = run_pipeline(RunContext([data_csv], run_root, config, beam_args=s3.beam_args,
                                       models=("cnn",), run_id="s3"))
    assert [o.step for o in outcomes if not o.skipped] == [
        s.name for s in build_steps(("cnn",)) if s.is_enabled(config)]
    for ref in DETERMINISTIC_OUTPUTS:
        producer, output = ref.split(".")
        got = read_commit(fileio.join(run_root, _directory(producer)))
        want = read_commit(os.path.join(reference_run, _directory(producer)))
        assert got.outputs[output]["fingerprint"] == want.outputs[output]["fingerprint"], ref
    got = read_commit(fileio.join(run_root, "transform")).manifest["result"]
    want = read_commit(os.path.join(reference_run, "transform")).manifest["result"]
    assert got["counts"] == want["counts"]
    assert got["offset"] == pytest.approx(want["offset"], rel=1e-6)
    assert got["scale"] == pytest.approx(want["scale"], rel=1e-6)
    assert fileio.exists(fileio.join(serving_root, "models.config"))
    faces = _test_faces(reference_run)
    np.testing.assert_allclose(
        _probabilities(_pushed(serving_root, "cnn"), faces),
        _probabilities(_pushed(os.path.join(reference_run, "serving_models"), "cnn"), faces),
        atol=1e-4)


def _directory(step_name: str) -> str:
    return step_by_name(step_name).directory
