"""`fer-pipeline compile --kfp X --import-model FILE --import-model-name NAME`: the notebook's
Keras file in the Kubeflow pipeline, as `import-model` then `evaluate`, `infra-validate` and
`push` take it locally.

The compiled graph is the declared one (pipeline/dag.py with the imported name among the
models): the data steps, `import-<NAME>` reading the file's URI, and the gate and push for
it. The components' own source, as the YAML holds it, then runs import, evaluate,
infra-validate and push in this process (as tests/test_bulk_inferrer.py runs its component;
tests/test_cluster.py runs a whole compiled pipeline with kfp.local) on a tiny notebook CNN
read from s3://, against the session's smoke run's ingest and transform outputs and a copy of
its ML Metadata store. Nothing is trained here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import read_commit
from fer_pipeline.core.config import MetadataConfig, load_config
from fer_pipeline.core.contract import MANIFEST_FILE
from fer_pipeline.pipeline import cli
from fer_pipeline.pipeline.dag import build_steps
from fer_pipeline.pipeline.lineage import model_lineage
from tests import notebook_models

NAME = "cnn_notebook"
IMPORT = f"import-{NAME}"


def _task(step_name: str) -> str:
    """KFP's name for a step's task and executor (it spells `_` as `-`)."""
    return step_name.replace("_", "-")


def _compile(path: Path, *extra: str) -> dict:
    assert cli.main(["compile", "--kfp", str(path), *extra]) == 0
    return yaml.safe_load(path.read_text())


def _artifact_inputs(task: dict) -> dict[str, str]:
    """input name -> "producer task.output" of one compiled task."""
    return {name: f"{a['taskOutputArtifact']['producerTask']}."
                  f"{a['taskOutputArtifact']['outputArtifactKey']}"
            for name, a in task["inputs"].get("artifacts", {}).items()}


def test_compiled_import_runs_the_declared_import_gate_and_push(tmp_path, capsys):
    uri = "s3://models/notebook/modelo_cnn.h5"
    spec = _compile(tmp_path / "pipeline.yaml", "--import-model", uri,
                    "--import-model-name", NAME, "--import-scale", "1/127.5",
                    "--import-input-shape", "48,48,1")
    assert f"importing {uri} as {NAME}" in capsys.readouterr().out
    tasks = spec["root"]["dag"]["tasks"]
    # The import alone: no model is trained beside it unless --models names one.
    steps = [s for s in build_steps((NAME,)) if s.is_enabled(load_config())]
    assert sorted(tasks) == sorted(_task(s.name) for s in steps)
    assert _task(IMPORT) in tasks and not any(t.startswith(("train-", "tune-")) for t in tasks)
    for step in steps:
        task = tasks[_task(step.name)]
        assert set(task.get("dependentTasks", [])) == {_task(u) for u in step.upstream()}
        assert task["inputs"]["parameters"]["models_json"] == {
            "runtimeValue": {"constant": json.dumps([NAME])}}, step.name
    assert _artifact_inputs(tasks[_task(IMPORT)]) == {"transform": "transform.transform"}
    model_run = f"{_task(IMPORT)}.model_run"
    assert _artifact_inputs(tasks["evaluate"]) == {"examples": "ingest.examples",
                                                   f"model_{NAME}": model_run}
    assert _artifact_inputs(tasks["infra-validate"])[f"model_{NAME}"] == model_run
    assert _artifact_inputs(tasks["push"]) == {
        "evaluation": "evaluate.evaluation", "infra_validation": "infra-validate.infra_validation",
        f"model_{NAME}": model_run}
    # The file and how to read it travel in the compiled config (imports.<name>).
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]
                        ["defaultValue"])
    assert config["imports"][NAME]["keras_file"] == uri
    assert config["imports"][NAME]["input_shape"] == [48, 48, 1]
    assert config["imports"][NAME]["scale"] == pytest.approx(1 / 127.5)
    source = spec["deploymentSpec"]["executors"][f"exec-{_task(IMPORT)}"]["container"][
        "command"][-1]
    assert f"run_component({IMPORT!r}, {{'transform': transform.uri}}" in source

    # --models adds trained models beside the import, gated and pushed together.
    spec = _compile(tmp_path / "both.yaml", "--models", "cnn", "--import-model", uri,
                    "--import-model-name", NAME)
    tasks = spec["root"]["dag"]["tasks"]
    assert {"train-cnn", _task(IMPORT)} <= set(tasks) and "train-vgg16" not in tasks
    assert _artifact_inputs(tasks["push"])["model_cnn"] == "train-cnn.model_run"
    assert tasks["push"]["inputs"]["parameters"]["models_json"] == {
        "runtimeValue": {"constant": json.dumps(["cnn", NAME])}}


@pytest.mark.parametrize("extra, message", [
    (["--import-model", "s3://b/m.h5"], "compile --import-model needs --import-model-name, one "
     "of cnn_notebook, vgg_notebook"),
    (["--models", f"cnn,{NAME}"], f"compile --models cnn,{NAME}: an imported model needs its "
     "file: --import-model KERAS_FILE --import-model-name NAME"),
    (["--import-model", "s3://b/m.onnx", "--import-model-name", NAME],
     "--import-model s3://b/m.onnx: expected a Keras .h5 or .keras file"),
    (["--import-model", "/nonexistent/m.h5", "--import-model-name", NAME],
     "--import-model /nonexistent/m.h5: no such file"),
])
def test_compile_refuses_an_import_it_cannot_run_in_one_line(tmp_path, capsys, extra, message):
    path = tmp_path / "pipeline.yaml"
    assert cli.main(["compile", "--kfp", str(path), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"[fer-pipeline] error: {message}"]
    assert not path.exists()


@dataclass
class _Artifact:
    """What a KFP component is handed for an input or output artifact: its URI."""
    uri: str


def _component(spec: dict, step_name: str):
    """The compiled component's function, from its source as the YAML holds it."""
    executor = spec["deploymentSpec"]["executors"][f"exec-{_task(step_name)}"]
    namespace: dict = {}
    exec(compile(executor["container"]["command"][-1], f"<component {step_name}>", "exec"),
         namespace)
    return namespace[step_name.replace("-", "_")]


def test_compiled_components_import_gate_and_push_a_file_read_from_s3(smoke_run, s3, tmp_path):
    model = notebook_models.notebook_cnn()
    notebook_models.fit_a_step(model)
    local = notebook_models.save_h5(model, str(tmp_path / "modelo_cnn.h5"))
    uri = s3.uri("kfp-import", "modelo_cnn.h5")
    fileio.copy_file(local, uri)
    spec = _compile(tmp_path / "pipeline.yaml", "--import-model", uri,
                    "--import-model-name", NAME)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    config = json.loads(parameters["config_json"]["defaultValue"])
    # An untrained file: let it through the gate (a run's config_json may say anything).
    config["evaluation"].update(baseline_margin=-1, min_accuracy={NAME: 0.0})
    serving_root, metadata_db = tmp_path / "serving", tmp_path / "metadata.sqlite"
    # A copy of the smoke run's store, which recorded the ingest and transform outputs the
    # components are given: lineage walks from the pushed version back to the CSV.
    shutil.copy(os.path.join(smoke_run.ctx.run_root, "metadata.sqlite"), metadata_db)
    common = dict(data=json.dumps([smoke_run.data]), serving_root=str(serving_root),
                  config_json=json.dumps(config), beam_args_json="[]",
                  metadata_db=str(metadata_db), models_json=json.dumps([NAME]))
    run = smoke_run.ctx.run_root
    examples = _Artifact(read_commit(os.path.join(run, "examples")).output_uri("examples"))
    transform = _Artifact(read_commit(os.path.join(run, "transform")).output_uri("transform"))
    root = tmp_path / "kfp_root"
    model_run, evaluation, infra, push = (_Artifact(f"file://{root}/{name}") for name in
                                          ("model_run", "evaluation", "infra", "push"))
    _component(spec, IMPORT)(transform=transform, model_run=model_run, **common)
    model_input = {f"model_{NAME}": model_run}
    _component(spec, "evaluate")(examples=examples, evaluation=evaluation, **model_input,
                                 **common)
    _component(spec, "infra-validate")(examples=examples, evaluation=evaluation,
                                       infra_validation=infra, **model_input, **common)
    _component(spec, "push")(evaluation=evaluation, infra_validation=infra, push=push,
                             **model_input, **common)

    assert (serving_root / NAME / "1" / "saved_model.pb").exists()
    digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    manifest = json.loads((root / "model_run" / MANIFEST_FILE).read_text())
    assert [record["uri"] for record in manifest["inputs"]["keras_file"]] == [uri]
    assert manifest["result"]["keras_file"] == uri and manifest["result"]["sha256"] == digest
    [found] = model_lineage(str(tmp_path), MetadataConfig(sqlite_path=str(metadata_db)), NAME)
    assert found["imported"]["uri"] == uri and found["imported"]["sha256"] == digest
    assert found["data"], "lineage reaches the CSV the test split came from"
    assert found["served_path"] == str(serving_root / NAME / "1")
