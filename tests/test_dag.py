"""The declared pipeline: one declaration drives the runner, the CLI and the docs."""
from __future__ import annotations

import dataclasses

import pytest

import fer_pipeline.core.config as config_module
from fer_pipeline.pipeline import dag
from fer_pipeline.pipeline.cli_parser import build_parser, step_commands
from fer_pipeline.core.config import MODEL_NAMES, RegisteredModel, load_config


def test_every_input_is_a_declared_output_of_an_earlier_step():
    steps = dag.build_steps()
    names = [s.name for s in steps]
    assert names[0] == "ingest" and names[-1] == "push"
    for step in steps:
        for ref in step.inputs.values():
            producer, output = ref.split(".", 1)
            if producer == dag.PIPELINE_INPUT:
                assert output in ("data", "schema")
                continue
            assert names.index(producer) < names.index(step.name)
            assert output in next(s for s in steps if s.name == producer).outputs
    bad = dataclasses.replace(steps[1], inputs={"examples": "ingest.nope"})
    with pytest.raises(ValueError, match="ingest.nope"):
        dag._check_order([steps[0], bad])


def test_the_cli_commands_come_from_the_declaration():
    commands = {name: steps for name, steps, _ in step_commands()}
    assert commands["train"] == [f"train-{m}" for m in MODEL_NAMES]
    declared = [s.name for s in dag.build_steps()]
    assert sorted(sum(commands.values(), [])) == sorted(declared)
    args = build_parser().parse_args(["train", "--output", "r", "--model", "vgg16"])
    assert args.model == "vgg16"
    args = build_parser().parse_args(["run", "--output", "r", "--data", "a.csv",
                                      "--data", "b.csv"])
    assert args.data == ["a.csv", "b.csv"]


def test_a_third_model_is_one_registry_entry(monkeypatch):
    registry = dict(config_module.MODEL_REGISTRY)
    registry["tiny"] = RegisteredModel(
        builder="fer_pipeline.components.trainer.models:build_cnn",
        defaults=dataclasses.replace(registry["cnn"].defaults, epochs=1), min_accuracy=0.4)
    monkeypatch.setattr(config_module, "MODEL_REGISTRY", registry)
    monkeypatch.setattr(dag, "MODEL_NAMES", tuple(registry))
    config = load_config()
    assert config.train.models["tiny"].epochs == 1
    assert config.evaluation.min_accuracy["tiny"] == 0.4
    steps = {s.name: s for s in dag.build_steps(tuple(registry))}
    assert steps["train-tiny"].directory == "models/tiny"
    assert steps["evaluate"].inputs["model_tiny"] == "train-tiny.model_run"
    assert steps["push"].inputs["model_tiny"] == "train-tiny.model_run"


def test_unknown_models_are_refused():
    with pytest.raises(ValueError, match="resnet"):
        dag.build_steps(("cnn", "resnet"))


def test_code_fingerprint_covers_the_modules_source(tmp_path, monkeypatch):
    (tmp_path / "mod_a.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dag.code_fingerprint(["mod_a"])
    assert dag.code_fingerprint(["mod_a"]) == before
    (tmp_path / "mod_a.py").write_text("A = 2\n")
    assert dag.code_fingerprint(["mod_a"]) != before
    with pytest.raises(ValueError, match="no_such_module"):
        dag.code_fingerprint(["no_such_module"])
