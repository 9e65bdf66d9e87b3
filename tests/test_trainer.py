"""Trainer: learns from real Transform output, resumes after a kill, trains multi-worker."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components.trainer.models import build_vgg16_base
from fer_pipeline.core.training_data import make_dataset
from fer_pipeline.components.trainer.distribution import WORKERS_DIR
from fer_pipeline.components.trainer.executor import (BEST_WEIGHTS_FILE, CHECKPOINTS_DIR,
                                                      HISTORY_FILE, SERVING_MODEL_DIR,
                                                      TRAINING_INFO_FILE, run_trainer)
from fer_pipeline.core.config import ModelConfig, TrainConfig
from fer_pipeline.core.contract import NUM_CLASSES, NUM_PIXELS
from fer_pipeline.core.net import free_ports
from fer_pipeline.pipeline.runner import committed_output
from tests.test_export import make_transform_dir
from tests.trainer_child import CRASH_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
CHANCE = 1.0 / NUM_CLASSES
# Plumbing only (learning is asserted on the session's smoke run): 96 faces, 3 epochs.
TINY_OVERRIDES = {"models": {"cnn": {"batch_size": 32, "epochs": 3, "learning_rate": 1e-3,
                                     "early_stopping_patience": 5, "max_train_examples": 96}},
                  "shuffle_buffer": 500, "seed": 5}


@pytest.fixture(scope="module")
def transform_dir(tmp_path_factory) -> str:
    """Real Transform output of synthetic faces; the test split is removed after."""
    root = tmp_path_factory.mktemp("trainer")
    output = make_transform_dir(str(root), {"train": 400, "validation": 100, "test": 21},
                                seed=2)
    # The trainer must never read the test split: with it gone, reading it would fail.
    shutil.rmtree(os.path.join(output, "transformed", "test"))
    return output


def _run_in_subprocess(transform_dir: str, output_dir: str, env: dict[str, str],
                       crash_after_epoch: int = 0) -> subprocess.Popen:
    """tests/trainer_child.py in a child process (a crash exits that process)."""
    args = json.dumps({"transform_dir": transform_dir, "output_dir": output_dir,
                       "train": TINY_OVERRIDES, "crash_after_epoch": crash_after_epoch})
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", "tests.trainer_child", args], cwd=REPO,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def test_dataset_is_batched_parsed_and_capped(transform_dir):
    pattern = os.path.join(transform_dir, "transformed", "train", "examples-*.tfrecord")
    ds = make_dataset(pattern, 64, training=True, seed=3, shuffle_buffer=500,
                      max_examples=200, num_examples=200)
    assert int(ds.cardinality()) == 4
    epochs = [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(2)]
    images, labels = (np.concatenate([b[i] for b in epochs[0]]) for i in (0, 1))
    assert images.shape == (200, NUM_PIXELS) and images.dtype == np.float32
    assert labels.dtype == np.int64 and set(labels) <= set(range(NUM_CLASSES))
    # Normalized with the training statistics: about zero mean, unit variance.
    assert abs(images.mean()) < 0.2 and 0.7 < images.std() < 1.3
    # The same capped subset every epoch, in a new order.
    second = np.concatenate([b[1] for b in epochs[1]])
    assert sorted(second.tolist()) == sorted(labels.tolist())
    assert not np.array_equal(second, labels)


def test_cnn_learns_well_above_chance_and_exports(smoke_run):
    """The session's smoke run trained the CNN on the demo's budget (the smoke profile):
    reading that run, rather than training a second CNN here, is what keeps this test
    cheap. The trainer ran inside the pipeline exactly as `make demo` runs it."""
    outcome = {o.step: o for o in smoke_run.outcomes}["train-cnn"]
    output, result = outcome.uri, outcome.manifest["result"]
    budget = smoke_run.config.train.models["cnn"]

    history = json.loads(Path(output, HISTORY_FILE).read_text())
    assert history["epochs_run"] == result["epochs_run"] == len(history["epochs"]) >= 4
    for record in history["epochs"]:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "images_per_s"} <= set(record)
    best = max(r["val_accuracy"] for r in history["epochs"])
    assert history["best_val_accuracy"] == result["best_val_accuracy"] == pytest.approx(best)
    assert best > 2.5 * CHANCE, history["epochs"]
    assert result["images_per_s"] > 0 and history["resumed_at_epoch"] is None

    info = json.loads(Path(output, TRAINING_INFO_FILE).read_text())
    assert info["model_name"] == "cnn" and info["vgg_weights"] is None
    assert info["train_examples"] == result["train_examples"] <= budget.max_train_examples
    assert info["validation_examples"] == result["validation_examples"] > 0
    assert info["num_replicas"] == 1
    assert info["config"]["models"]["cnn"]["epochs"] == budget.epochs
    assert Path(output, "training_log.csv").exists()
    assert list(Path(output, "logs").rglob("events.out.tfevents.*"))
    # A finished run leaves no checkpoint to resume from.
    assert not Path(output, CHECKPOINTS_DIR).exists()
    # Temperature scaling on the validation split, recorded and baked into the export.
    calibration = info["calibration"]
    assert calibration["calibrated"] and calibration["logits"] == "logits"
    assert calibration["examples"] == info["validation_examples"]
    assert result["calibration"] == calibration
    assert calibration["after"]["nll"] <= calibration["before"]["nll"]
    served = tf.saved_model.load(os.path.join(output, SERVING_MODEL_DIR))
    assert float(served.temperature.numpy()) == pytest.approx(calibration["temperature"])

    # The exported model, restored to the best epoch, scores that epoch's accuracy.
    validation = os.path.join(committed_output(smoke_run.run_root, "ingest.examples"),
                              "validation")
    assert _served_validation_accuracy(validation, output) == pytest.approx(best, abs=1e-6)


def _served_validation_accuracy(validation_dir: str, output: str) -> float:
    """Accuracy of output/serving_model on the raw validation examples in validation_dir."""
    serve = tf.saved_model.load(os.path.join(output, SERVING_MODEL_DIR)).signatures[
        "serving_examples"]
    raw = tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(validation_dir,
                                                                "*.tfrecord")))
    # A list, not a numpy 'S' array: numpy would strip the records' trailing zero bytes.
    serialized = tf.constant(list(raw.as_numpy_iterator()))
    labels = tf.io.parse_example(serialized, {"emotion": tf.io.FixedLenFeature([], tf.int64)})
    predicted = serve(examples=serialized)["class_id"].numpy()
    return float(np.mean(predicted == labels["emotion"].numpy()))


def test_vgg16_from_a_local_weights_file_with_mixed_precision_and_xla(transform_dir,
                                                                      tmp_path):
    weights = str(tmp_path / "vgg16_notop.weights.h5")
    build_vgg16_base("none").save_weights(weights)
    config = dataclasses.replace(
        TrainConfig(), mixed_precision=True, xla=True, shuffle_buffer=200,
        models={"vgg16": ModelConfig(batch_size=32, epochs=1, learning_rate=5e-4,
                                     max_train_examples=64, weights=weights)})
    output = str(tmp_path / "vgg16")
    result = run_trainer(transform_dir, output, config, "vgg16")

    info = json.loads(Path(output, TRAINING_INFO_FILE).read_text())
    assert info["vgg_weights"] == result.vgg_weights == weights
    assert info["precision_policy"] == "mixed_bfloat16" and info["jit_compile"] is True
    assert info["train_examples"] == 64
    # The process-wide policy is put back; serving still returns float32 probabilities.
    assert keras.mixed_precision.global_policy().name == "float32"
    serve = tf.saved_model.load(result.serving_model_dir).signatures["serving_uint8"]
    out = serve(pixels=tf.zeros([2, 48, 48], tf.uint8))
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-3)
    # The logits under a mixed policy: float32, read off the float32 softmax head.
    assert out["logits"].dtype == tf.float32 and info["calibration"]["calibrated"]
    logits = out["logits"].numpy() / info["calibration"]["temperature"]
    scaled = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               scaled / scaled.sum(axis=1, keepdims=True), atol=1e-5)


def test_killed_run_resumes_from_its_last_checkpoint(transform_dir, tmp_path):
    output = str(tmp_path / "resumable")
    code, log = _finish(_run_in_subprocess(transform_dir, output, {}, crash_after_epoch=1))
    assert code == CRASH_EXIT_CODE, log
    checkpoints = Path(output, CHECKPOINTS_DIR)
    assert (checkpoints / "training_metadata.json").exists(), log
    assert json.loads((checkpoints / "training_metadata.json").read_text())["epoch"] == 1
    # Early stopping's best weights are checkpointed too, so the resumed run can still
    # export epoch 1 if it stays the best.
    assert (checkpoints / BEST_WEIGHTS_FILE).exists()
    assert not Path(output, SERVING_MODEL_DIR).exists()

    code, log = _finish(_run_in_subprocess(transform_dir, output, {}))
    assert code == 0, log
    assert "Epoch 1/3" not in log and "Epoch 2/3" in log
    history = json.loads(Path(output, HISTORY_FILE).read_text())
    assert history["resumed_at_epoch"] == 2
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3]
    best = max(history["epochs"], key=lambda r: r["val_accuracy"])
    assert history["best_epoch"] == history["exported_epoch"] == best["epoch"]
    validation = os.path.join(os.path.dirname(transform_dir), "examples", "validation")
    assert _served_validation_accuracy(validation, output) == pytest.approx(
        best["val_accuracy"], abs=1e-6)


def test_multi_worker_training_keeps_workers_in_sync(transform_dir, tmp_path):
    output = str(tmp_path / "multi")
    workers = [f"localhost:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(_run_in_subprocess(transform_dir, output,
                                            {"TF_CONFIG": json.dumps(tf_config)}))
    results = [_finish(p) for p in processes]
    for code, log in results:
        assert code == 0, log

    # The chief writes the step's outputs; the other worker keeps its own copy apart.
    dirs = [Path(output), Path(output, WORKERS_DIR, "worker-1")]
    infos = [json.loads((d / TRAINING_INFO_FILE).read_text()) for d in dirs]
    assert [i["strategy"] for i in infos] == ["CollectiveAllReduceStrategy"] * 2
    assert [i["num_replicas"] for i in infos] == [2, 2]
    histories = [json.loads((d / HISTORY_FILE).read_text())["epochs"] for d in dirs]
    assert len(histories[0]) == 3
    assert [r["loss"] for r in histories[0]] == [r["loss"] for r in histories[1]]

    weights = [tf.saved_model.load(str(d / SERVING_MODEL_DIR)).model_variables for d in dirs]
    assert len(weights[0]) == len(weights[1]) > 0
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
