"""Configuration: seed defaults, profiles, file overrides, and typos caught."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fer_pipeline.pipeline.cli_parser import STEP_COMMANDS, build_parser
from fer_pipeline.core.config import load_config


def test_defaults_are_the_notebooks():
    config = load_config()
    assert (config.train.models["cnn"].batch_size, config.train.models["cnn"].epochs) == (70, 115)
    assert config.train.models["cnn"].learning_rate == 2e-4
    assert config.train.models["cnn"].early_stopping_patience == 40
    assert (config.train.models["vgg16"].batch_size, config.train.models["vgg16"].epochs) == (65, 25)
    assert config.train.models["vgg16"].learning_rate == 5e-4
    assert config.ingest.seed == 42 and config.train.models["vgg16"].weights == "none"


def test_smoke_profile_and_yaml_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  models:\n    cnn:\n      epochs: 2\ningest:\n  split_mode: random\n"
                    "  split_fractions: [0.7, 0.2, 0.1]\n")
    config = load_config(str(path), profile="smoke")
    assert config.train.models["cnn"].epochs == 2
    assert config.train.models["cnn"].max_train_examples > 0  # from the smoke profile
    assert config.ingest.split_fractions == (0.7, 0.2, 0.1)
    assert config.train.models["vgg16"].learning_rate == 5e-4  # untouched defaults survive


def test_unknown_keys_and_profiles_are_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"models": {"cnn": {"epocs": 3}}}}')
    with pytest.raises(ValueError, match="epocs"):
        load_config(str(path))
    path.write_text('{"train": {"models": {"resnet": {"epochs": 3}}}}')
    with pytest.raises(ValueError, match="resnet"):
        load_config(str(path))
    with pytest.raises(ValueError, match="profile"):
        load_config(profile="fast")


def test_every_cli_command_has_help():
    parser = build_parser()
    for command in ["synth", "run"] + [name for name, _, _ in STEP_COMMANDS]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
    out = subprocess.run([sys.executable, "-m", "fer_pipeline.pipeline.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "ingest" in out and "push" in out


def test_checked_in_schema_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from fer_pipeline.pipeline.runner import RunContext

    monkeypatch.chdir(tmp_path)
    ctx = RunContext(data_paths=[], run_root=str(tmp_path / "run"), config=load_config())
    assert os.path.isfile(ctx.schema_path)
    assert ctx.schema_path.endswith("schemas/fer2013/schema.pbtxt")


def test_default_schema_is_the_packaged_one_and_a_given_path_wins(tmp_path, monkeypatch):
    from importlib import resources

    from fer_pipeline.core.config import DEFAULT_SCHEMA_PATH, resolve_schema_path
    from fer_pipeline.pipeline.runner import RunContext

    monkeypatch.chdir(tmp_path)
    # A schemas/ folder in the working directory does not shadow the packaged default.
    (tmp_path / "schemas" / "fer2013").mkdir(parents=True)
    (tmp_path / DEFAULT_SCHEMA_PATH).write_text("")
    packaged = resources.files("fer_pipeline.schemas") / "fer2013" / "schema.pbtxt"
    assert resolve_schema_path(DEFAULT_SCHEMA_PATH) == str(packaged)
    assert os.path.isfile(packaged)
    # A path the user gives is used: relative to the working directory, absolute, or a URI.
    assert resolve_schema_path("mine.pbtxt") == str(tmp_path / "mine.pbtxt")
    assert resolve_schema_path("/elsewhere/s.pbtxt") == "/elsewhere/s.pbtxt"
    assert resolve_schema_path("gs://bucket/s.pbtxt") == "gs://bucket/s.pbtxt"
    config = load_config(overrides={"validation": {"schema_path": "mine.pbtxt"}})
    ctx = RunContext(data_paths=[], run_root=str(tmp_path / "run"), config=config)
    assert ctx.schema_path == str(tmp_path / "mine.pbtxt")
