"""Tune and warm start: a distributed KerasTuner search (a chief and 2 worker processes on
loopback) whose chosen values train then uses; a warm-started CNN reaching the cold run's
validation accuracy in fewer steps; the one-line reasons a warm start does not happen."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from fer_pipeline.components.trainer.executor import run_trainer
from fer_pipeline.components.trainer.models import build_model
from fer_pipeline.components.trainer.warm_start import warm_start
from fer_pipeline.components.tuner import run_tuner
from fer_pipeline.core.config import load_config, registered_model
from fer_pipeline.core.contract import (BEST_HYPERPARAMETERS_FILE, HISTORY_FILE,
                                        SERVING_MODEL_DIR, TRAINING_INFO_FILE, TRIALS_DIR)
from fer_pipeline.core.search_space import Choice, Float, apply
from fer_pipeline.pipeline.dag import build_steps
from tests.test_export import make_transform_dir

TRAIN_FACES = 300
BATCH = 16
# Small, quick to learn: the warm-start test needs a cold run that improves over epochs.
CNN = {"batch_size": BATCH, "learning_rate": 1e-3, "max_train_examples": 0, "dropout": 0.0,
       "width": 0.5, "early_stopping_patience": 50}


@pytest.fixture(scope="module")
def transform_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tuner")
    return make_transform_dir(str(root), {"train": TRAIN_FACES, "validation": 100, "test": 7},
                              seed=2)


def _config(epochs: int, **tune):
    return load_config(profile="smoke", overrides={
        "train": {"models": {"cnn": {**CNN, "epochs": epochs}}, "shuffle_buffer": 500},
        "tune": {"max_trials": 2, "epochs_per_trial": 1, "max_train_examples": 64, **tune}})


def test_tune_is_a_declared_step_off_unless_asked():
    steps = {s.name: s for s in build_steps()}
    names = list(steps)
    assert names.index("transform") < names.index("tune-cnn") < names.index("train-cnn")
    assert steps["train-cnn"].inputs["tuning"] == "tune-cnn.tuning"
    assert "tuning" in steps["train-cnn"].optional_inputs
    assert not steps["tune-cnn"].is_enabled(load_config(profile="smoke"))
    assert steps["tune-cnn"].is_enabled(load_config(overrides={"tune": {"enabled": True}}))
    space = registered_model("cnn").search_space
    assert {"learning_rate", "dropout", "width", "batch_size"} <= set(space)
    tuned = apply(registered_model("vgg16").defaults, {"learning_rate": 2e-4, "batch_size": 32})
    # The rate a trial measured is the one the model trains with, from scratch too.
    assert tuned.learning_rate == tuned.scratch_learning_rate == 2e-4
    with pytest.raises(ValueError, match="epochs"):
        apply(tuned, {"epochs": 3})
    with pytest.raises(ValueError):
        Float(1e-3, 1e-4, log=True)
    with pytest.raises(ValueError):
        Choice((1, 1))


@pytest.mark.slow
def test_a_distributed_search_chooses_values_that_train_uses(transform_dir, tmp_path):
    config = _config(epochs=1)
    out = str(tmp_path / "tuning")
    result = run_tuner(transform_dir, out, config.tune, config.train, "cnn", workers=2)

    # A chief and two workers, each its own process with its own log; both workers asked
    # the chief's oracle for trials (KerasTuner saves each tuner's state by its id).
    search = Path(out, TRIALS_DIR, "search")
    assert sorted(p.name for p in Path(out, "logs").iterdir()) == \
        ["chief.log", "tuner0.log", "tuner1.log"]
    assert (search / "tuner0.json").exists() and (search / "tuner1.json").exists()
    assert result.workers == 2 and result.trials == 2
    assert not list(search.rglob("*.weights.h5"))       # records kept, weights dropped

    record = json.loads(Path(out, BEST_HYPERPARAMETERS_FILE).read_text())
    assert len(record["trials"]) == 2
    assert set(record["hyperparameters"]) == set(registered_model("cnn").search_space)
    if record["source"] == "defaults":
        assert record["best_trial"]["val_accuracy"] <= record["defaults"]["val_accuracy"]
        assert record["hyperparameters"] == record["defaults"]["hyperparameters"]
        assert "no trial of 2 beat the declared defaults" in result.summary
    else:
        assert record["best_trial"]["val_accuracy"] > record["defaults"]["val_accuracy"]
        assert record["hyperparameters"] == record["best_trial"]["hyperparameters"]

    # Train takes the chosen values and says where they came from.
    trained = run_trainer(transform_dir, str(tmp_path / "model"), config.train, "cnn",
                          tuning_dir=out)
    assert trained.hyperparameters["source"] == "tune"
    info = json.loads(Path(tmp_path, "model", TRAINING_INFO_FILE).read_text())
    for name, value in record["hyperparameters"].items():
        assert info["model_config"][name] == pytest.approx(value)


@pytest.mark.slow
def test_a_warm_start_reaches_the_cold_accuracy_in_fewer_steps(transform_dir, tmp_path):
    cold_config = _config(epochs=6).train
    cold = run_trainer(transform_dir, str(tmp_path / "cold"), cold_config, "cnn")
    assert cold.warm_start is None
    cold_curve = [e["val_accuracy"] for e in
                  json.loads(Path(tmp_path, "cold", HISTORY_FILE).read_text())["epochs"]]
    target = max(cold_curve)
    steps_per_epoch = -(-TRAIN_FACES // BATCH)
    cold_steps = (cold_curve.index(target) + 1) * steps_per_epoch
    assert cold_steps > steps_per_epoch, cold_curve   # the cold run needed several epochs

    # The cold run's model is what serving has now (its best epoch: early stopping).
    serving_root = tmp_path / "serving"
    shutil.copytree(Path(tmp_path, "cold", SERVING_MODEL_DIR), serving_root / "cnn" / "3")
    said = []
    warm = run_trainer(transform_dir, str(tmp_path / "warm"),
                       dataclasses.replace(_config(epochs=1).train, warm_start=True), "cnn",
                       serving_root=str(serving_root), report=said.append)
    assert said == [f"warm start from served version 3 ({serving_root / 'cnn' / '3'})"]
    assert warm.warm_start["used"] and warm.warm_start["base_version"] == 3
    warm_curve = [e["val_accuracy"] for e in
                  json.loads(Path(tmp_path, "warm", HISTORY_FILE).read_text())["epochs"]]
    assert warm_curve[0] >= target, (warm_curve, cold_curve)
    assert steps_per_epoch < cold_steps

    # Why a warm start does not happen, in one line: another width, nothing served.
    wider = dataclasses.replace(cold_config, models={
        "cnn": dataclasses.replace(cold_config.models["cnn"], width=1.0)})
    record = warm_start(build_model("cnn", wider), "cnn", str(serving_root))
    assert not record["used"] and record["summary"].startswith(
        "starts fresh, not from served version 3: its architecture differs (")
    record = warm_start(build_model("cnn", wider), "cnn", str(tmp_path / "empty"))
    assert not record["used"] and "no cnn version is served" in record["summary"]
    assert "\n" not in record["summary"]
    assert os.path.isdir(tmp_path / "warm" / SERVING_MODEL_DIR)
