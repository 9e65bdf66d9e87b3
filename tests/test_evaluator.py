"""Evaluator tests on tiny but real SavedModels whose accuracy we set by construction.

The data: each test image "shows" a class d in its first 7 pixels (pixel d is 255, the
other six are 0; the rest is noise). For the first 80 % of images d is the true label, for
the rest d = label + 1. A model with `shift` s predicts (d + s) mod 7, so shift 0 is right
exactly on the first 80 % and shift 6 (i.e. -1) exactly on the other 20 %.

`make_model_dir` and `write_test_split` are reused by tests/test_pusher.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fer_pipeline.core.config import EvalConfig
from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES, NUM_CLASSES, NUM_PIXELS
from tests.serving_fixtures import save_contract_model

GOOD_FRACTION = 0.8
# components/trainer/executor.py's history.json: one record per epoch under "epochs".
HISTORY = {
    "epochs": [{"epoch": e + 1, "loss": loss, "accuracy": acc, "val_loss": vloss,
                "val_accuracy": vacc, "train_seconds": 1.0, "images_per_s": 100.0}
               for e, (loss, acc, vloss, vacc) in enumerate(
                   [(1.9, 0.2, 1.95, 0.2), (1.5, 0.4, 1.6, 0.35), (1.2, 0.6, 1.4, 0.5)])],
    "epochs_run": 3, "best_epoch": 3, "best_val_accuracy": 0.5, "exported_epoch": 3,
    "images_per_s": 100.0, "resumed_at_epoch": None, "monitor": "val_accuracy"}


# ----------------------------------------------------------------------------- fixtures' tools

def _example(label: int, pixels: np.ndarray, row: int):
    import tensorflow as tf

    def int64(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    def raw(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "emotion": int64(label), "pixels": raw(pixels.astype(np.uint8).tobytes()),
        "usage": raw(b"PrivateTest"), "row_number": int64(row), "source_row": int64(row),
        "augmentation": raw(b"original")}))


def make_split_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], pixels [n, 2304] uint8) following the module docstring's recipe."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    shown = labels.copy()
    cut = int(round(n * GOOD_FRACTION))
    shown[cut:] = (labels[cut:] + 1) % NUM_CLASSES
    pixels = rng.integers(0, 256, size=(n, NUM_PIXELS))
    pixels[:, :NUM_CLASSES] = 0
    pixels[np.arange(n), shown] = 255
    return labels, pixels.astype(np.uint8)


def write_test_split(examples_dir: Path, n: int = 300, seed: int = 0,
                     shards: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Writes examples_dir/test/examples-*.tfrecord (and a decoy train split)."""
    import tensorflow as tf

    labels, pixels = make_split_arrays(n, seed)
    for split, (lab, pix) in {"test": (labels, pixels),
                              # Wrong on purpose: an evaluator that read it would score 0.
                              "train": ((labels[:50] + 3) % NUM_CLASSES, pixels[:50])}.items():
        folder = examples_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        count = shards if split == "test" else 1
        for shard in range(count):
            name = folder / f"examples-{shard:05d}-of-{count:05d}.tfrecord"
            with tf.io.TFRecordWriter(str(name)) as writer:
                for i in range(shard, len(lab), count):
                    writer.write(_example(int(lab[i]), pix[i], i + 2).SerializeToString())
    # Shards interleave rows; the evaluator reads shard by shard, so report that order.
    order = np.concatenate([np.arange(s, n, shards) for s in range(shards)])
    return labels[order], pixels[order]


def tiny_weights(shift: int, scale: float) -> np.ndarray:
    """Weights making the model compute softmax(scale * onehot((shown + shift) % 7))."""
    weights = np.zeros((NUM_PIXELS, NUM_CLASSES), dtype=np.float32)
    for k in range(NUM_CLASSES):
        weights[k, (k + shift) % NUM_CLASSES] = scale
    return weights


def expected_probabilities(pixels: np.ndarray, shift: int, scale: float) -> np.ndarray:
    """The tiny model's output computed with numpy only (independent of TF)."""
    shown = pixels[:, :NUM_CLASSES].argmax(axis=1)
    logits = np.zeros((len(pixels), NUM_CLASSES))
    logits[np.arange(len(pixels)), (shown + shift) % NUM_CLASSES] = scale
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def make_model_dir(root: Path, name: str, shift: int = 0, scale: float = 3.0,
                   history: bool = True) -> str:
    """models/<name>/ with serving_model/ (real SavedModel), history.json, training_info.json."""
    model_dir = root / name
    save_contract_model(str(model_dir / "serving_model"), tiny_weights(shift, scale))
    if history:
        (model_dir / "history.json").write_text(json.dumps(HISTORY))
    (model_dir / "training_info.json").write_text(json.dumps({
        "model": name, "vgg_weights": "none", "config": {}, "counts": {"train": 10}}))
    return str(model_dir)


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    labels, pixels = write_test_split(root / "examples", n=280)
    models = root / "models"
    dirs = {"good": make_model_dir(models, "good", shift=0, scale=3.0),
            "bad": make_model_dir(models, "bad", shift=6, scale=2.0, history=False)}
    return root, labels, pixels, dirs


def run(setup, serving_root, config, name="evaluation", model_names=("good", "bad")):
    from fer_pipeline.components.evaluator import run_evaluator

    root, _, _, dirs = setup
    return run_evaluator(str(root / "examples"), {n: dirs[n] for n in model_names},
                         str(serving_root), str(root / name), config)


def test_metrics_match_an_independent_numpy_computation(setup, tmp_path):
    from fer_pipeline.core.ensemble import combine_batch

    root, labels, pixels, _ = setup
    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.7}, tie_tolerance=0.05)
    result = run(setup, tmp_path / "serving", config)
    evaluation = json.loads(Path(result.evaluation_path).read_text())
    good = evaluation["models"]["good"]

    probs = expected_probabilities(pixels, shift=0, scale=3.0)
    predicted = probs.argmax(axis=1)
    assert result.test_examples == len(labels) == 280           # the decoy train split unread
    assert good["accuracy"] == pytest.approx(GOOD_FRACTION)     # by construction
    assert evaluation["models"]["bad"]["accuracy"] == pytest.approx(1 - GOOD_FRACTION)
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert good["loss"] == pytest.approx(loss, rel=1e-5)
    for k in range(NUM_CLASSES):
        tp = np.sum((predicted == k) & (labels == k))
        precision = tp / np.sum(predicted == k)
        recall = tp / np.sum(labels == k)
        row = good["per_class"][k]
        assert (row["class_name"], row["class_name_es"]) == (CLASS_NAMES[k], CLASS_NAMES_ES[k])
        assert row["support"] == np.sum(labels == k)
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        for j in range(NUM_CLASSES):
            assert good["confusion_matrix"][k][j] == np.sum((labels == k) & (predicted == j))

    # Ensemble: good (conf e^3/(e^3+6) = 0.77) beats bad (e^2/(e^2+6) = 0.55) by more than
    # the tolerance whenever they disagree (always: shifts differ), so it equals "good".
    ids, _, review = combine_batch({"good": probs,
                                    "bad": expected_probabilities(pixels, 6, 2.0)}, 0.05)
    assert not review.any()
    assert evaluation["ensemble"]["accuracy"] == pytest.approx(np.mean(ids == labels))
    # Every face is a disagreement decided alone with the same gap (up to float32 rounding),
    # so there are 12 closest calls, smallest gap first, each with that gap.
    gap = np.exp(3) / (np.exp(3) + 6) - np.exp(2) / (np.exp(2) + 6)
    closest = evaluation["ensemble"]["closest_calls"]
    assert len({c["index"] for c in closest}) == 12
    assert [c["gap"] for c in closest] == sorted(c["gap"] for c in closest)
    assert all(c["gap"] == pytest.approx(gap, rel=1e-5) for c in closest)
    assert all(c["decision"] == CLASS_NAMES[ids[c["index"]]] for c in closest)
    assert evaluation["ensemble"]["human_review_rate"] == 0.0
    assert evaluation["data"]["class_distribution"] == {
        CLASS_NAMES[k]: int(np.sum(labels == k)) for k in range(NUM_CLASSES)}
    assert good["vgg_weights"] == "none"


def test_gates_and_reasons(setup, tmp_path):
    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.3}, min_class_recall=None)
    result = run(setup, tmp_path / "serving", config)
    blessings = json.loads(Path(result.blessings_path).read_text())
    assert blessings["good"]["blessed"] is True
    assert "accuracy 0.800 >= 0.700" in blessings["good"]["reasons"]
    assert blessings["bad"]["blessed"] is False
    assert "accuracy 0.200 < 0.300" in blessings["bad"]["reasons"]
    assert result.blessed == {"good": True, "bad": False}

    # A per-class recall floor above what "good" reaches on some class blocks it too.
    strict = EvalConfig(min_accuracy={"good": 0.7}, min_class_recall=0.95)
    result = run(setup, tmp_path / "serving", strict, name="strict", model_names=("good",))
    reasons = json.loads(Path(result.blessings_path).read_text())["good"]["reasons"]
    assert result.blessed == {"good": False}
    assert any(re.match(r"recall of \w+ \(\w+\) 0\.\d{3} < 0\.950", r) for r in reasons)

    # A model with no configured threshold is never blessed silently.
    result = run(setup, tmp_path / "serving", EvalConfig(min_accuracy={}), name="ungated",
                 model_names=("good",))
    assert result.blessed == {"good": False}


def test_regression_against_the_served_version_blocks(setup, tmp_path):
    import shutil

    root, _, _, dirs = setup
    serving = tmp_path / "serving"
    # The "good" model (accuracy 0.8) is in serving as version 4; a worse candidate is not.
    shutil.copytree(Path(dirs["good"]) / "serving_model", serving / "bad" / "4")
    (serving / "bad" / "not-a-version").mkdir()      # ignored, as TF Serving ignores it
    config = EvalConfig(min_accuracy={"bad": 0.1}, max_regression=0.01)
    result = run(setup, serving, config, name="regress", model_names=("bad",))
    evaluation = json.loads(Path(result.evaluation_path).read_text())
    assert evaluation["models"]["bad"]["served"]["version"] == 4
    assert evaluation["models"]["bad"]["served"]["accuracy"] == pytest.approx(GOOD_FRACTION)
    reasons = json.loads(Path(result.blessings_path).read_text())["bad"]["reasons"]
    assert result.blessed == {"bad": False}
    assert "accuracy 0.200 >= 0.100" in reasons       # the absolute threshold alone passes
    assert any(r.startswith("accuracy 0.200 < 0.790 (served version 4") for r in reasons)


def _constant_model_dir(root: Path, name: str, class_id: int) -> str:
    """A model that answers `class_id` for every face (zero weights, one-hot bias)."""
    bias = np.zeros(NUM_CLASSES, dtype=np.float32)
    bias[class_id] = 4.0
    model_dir = root / name
    save_contract_model(str(model_dir / "serving_model"),
                        np.zeros((NUM_PIXELS, NUM_CLASSES), np.float32), bias)
    return str(model_dir)


def test_a_model_that_gives_one_answer_is_held_back_by_the_majority_baseline(setup, tmp_path):
    from fer_pipeline.components.evaluator import run_evaluator

    root, labels, _, dirs = setup
    majority = int(np.bincount(labels, minlength=NUM_CLASSES).argmax())
    baseline = np.mean(labels == majority)
    constant = _constant_model_dir(tmp_path / "models", "constant", majority)
    # min_accuracy 0.0 is what the smoke profile used to set for VGG16: it passes that check.
    config = EvalConfig(min_accuracy={"good": 0.7, "constant": 0.0}, baseline_margin=0.05)
    result = run_evaluator(str(root / "examples"), {"good": dirs["good"], "constant": constant},
                           str(tmp_path / "serving"), str(tmp_path / "evaluation"), config)
    blessings = json.loads(Path(result.blessings_path).read_text())
    evaluation = json.loads(Path(result.evaluation_path).read_text())
    assert result.blessed == {"good": True, "constant": False}
    assert evaluation["data"]["majority_baseline"] == {
        "class_id": majority, "class_name": CLASS_NAMES[majority],
        "accuracy": pytest.approx(baseline)}
    assert evaluation["models"]["constant"]["accuracy"] == pytest.approx(baseline)
    assert "accuracy 0.000" not in " ".join(blessings["constant"]["reasons"])
    assert blessings["constant"]["summary"] == (
        f"constant held back: test accuracy {baseline:.2f} does not beat the majority-class "
        f"baseline {baseline:.2f} by 0.05")
    assert blessings["good"]["summary"] == (
        "good blessed: test accuracy 0.80 passed all 3 checks")
    assert result.summaries == {n: b["summary"] for n, b in blessings.items()}
    # The ensemble's agreement rate: constant and good agree where good answers `majority`.
    good_says = expected_probabilities(_pixels_in_file_order(root), 0, 3.0).argmax(axis=1)
    assert evaluation["ensemble"]["agreement_rate"] == pytest.approx(np.mean(good_says == majority))

    # The client will combine the blessed model alone: that ensemble is "good" itself.
    assert evaluation["ensemble_blessed"]["models"] == ["good"]
    assert evaluation["ensemble_blessed"]["accuracy"] == pytest.approx(GOOD_FRACTION)
    assert evaluation["ensemble_blessed"]["human_review_rate"] == 0.0

    # A margin of 0 with a threshold at the baseline passes a model exactly at the baseline.
    lenient = EvalConfig(min_accuracy={"constant": 0.0}, baseline_margin=0.0)
    result = run_evaluator(str(root / "examples"), {"constant": constant},
                           str(tmp_path / "serving"), str(tmp_path / "lenient"), lenient)
    assert result.blessed == {"constant": True}


def _pixels_in_file_order(root: Path) -> np.ndarray:
    from fer_pipeline.components.evaluator import load_test_split

    return load_test_split(str(root / "examples")).pixels.reshape(-1, NUM_PIXELS)


def test_mistakes_are_the_most_confident_wrong_answers_per_class(setup, tmp_path):
    from fer_pipeline.components.evaluator import MISTAKES_PER_CLASS

    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.3})
    result = run(setup, tmp_path / "serving", config, name="mistakes")
    evaluation = json.loads(Path(result.evaluation_path).read_text())
    root, labels, pixels, _ = setup
    probs = expected_probabilities(pixels, shift=6, scale=2.0)
    for k, class_name in enumerate(CLASS_NAMES):
        shown = evaluation["models"]["bad"]["mistakes"][class_name]
        wrong = np.flatnonzero((labels == k) & (probs.argmax(axis=1) != k))
        assert len(shown) == min(MISTAKES_PER_CLASS, len(wrong))
        for item in shown:
            assert labels[item["index"]] == k and item["true_class"] == class_name
            assert item["answers"]["bad"]["class_id"] != k
            assert set(item["answers"]) == {"good", "bad"}
        confidences = [item["answers"]["bad"]["confidence"] for item in shown]
        assert confidences == sorted(confidences, reverse=True)


def test_report_is_self_contained_with_images_and_both_languages(setup, tmp_path):
    import base64

    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.3})
    result = run(setup, tmp_path / "serving", config, name="report")
    page = Path(result.report_path).read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    charts = dict(re.findall(
        r'<script type="application/json" data-chart-data="([\w-]+)">(.*?)</script>', page))
    # distribution; per model history (bad has none), per-class, confusion, reliability
    # before and after (inline SVG); ensemble confusion and reliability
    assert sorted(charts) == sorted(["test-distribution", "history-good", "per-class-good",
                                     "confusion-good", "per-class-bad", "confusion-bad",
                                     "confusion-ensemble"] + [
        f"reliability-{name}-{when}" for name in ("good", "bad", "ensemble")
        for when in ("before", "after")])
    assert page.count("<svg") == 6 and "http://www.w3.org/2000/svg" in page
    history = json.loads(charts["history-good"])
    assert history["epoch"] == [1, 2, 3]
    assert history["val_loss"] == [r["val_loss"] for r in HISTORY["epochs"]]
    assert history["accuracy"] == [r["accuracy"] for r in HISTORY["epochs"]]
    assert "No per-epoch records in history.json" in page        # for "bad"
    for k in range(NUM_CLASSES):
        assert CLASS_NAMES[k] in page and CLASS_NAMES_ES[k] in page
    assert "HELD BACK" in page and "bad held back: test accuracy 0.20 is below its " \
        "threshold 0.30" in page
    assert "initial weights" in page
    # Nothing is fetched: every src/href is an inline data: URI (the browser test checks
    # the requests themselves).
    assert all(url.startswith("data:") for url in re.findall(r'(?:src|href)="([^"]*)"', page))


def test_evaluator_on_an_object_store_matches_a_local_run(s3, setup, tmp_path):
    """Examples, models and outputs on s3:// (moto): the same numbers and blessings."""
    from fer_pipeline.components.evaluator import run_evaluator
    from fer_pipeline.core import fileio

    root, _, _, dirs = setup
    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.3})
    local = run(setup, tmp_path / "serving", config, name="local")
    examples = s3.unique_uri("examples")
    fileio.copytree(str(root / "examples"), examples)
    remote_dirs = {}
    for name, model_dir in dirs.items():
        remote_dirs[name] = s3.unique_uri(name)
        fileio.copytree(model_dir, remote_dirs[name])
    remote = run_evaluator(examples, remote_dirs, s3.unique_uri("serving"),
                           s3.unique_uri("evaluation"), config)
    assert remote.report_path.startswith("s3://")
    assert (remote.accuracy, remote.blessed, remote.summaries) == \
        (local.accuracy, local.blessed, local.summaries)
    remote_models = fileio.read_json(remote.evaluation_path)["models"]
    local_models = json.loads(Path(local.evaluation_path).read_text())["models"]
    for name in dirs:
        assert remote_models[name]["mistakes"] == local_models[name]["mistakes"]
        assert remote_models[name]["history"] == local_models[name]["history"]
    assert "<!DOCTYPE html>" in fileio.read_text(remote.report_path)


def test_confidence_gaps_and_closest_calls_by_hand():
    from fer_pipeline.components.evaluator import confidence_gaps, ensemble_metrics

    def probs(*rows):
        out = np.full((len(rows), NUM_CLASSES), 0.0)
        for i, (cls, conf) in enumerate(rows):
            out[i] = (1 - conf) / (NUM_CLASSES - 1)
            out[i, cls] = conf
        return out

    a = probs((0, 0.9), (1, 0.6), (2, 0.5), (3, 0.8))
    b = probs((0, 0.8), (2, 0.3), (4, 0.48), (5, 0.4))
    labels = np.array([0, 1, 2, 3])
    class_ids = np.array([0, 1, 2, 3])
    gaps = confidence_gaps({"a": a, "b": b}, class_ids)
    assert gaps[0] == np.inf                                   # both say 0
    assert gaps[1:] == pytest.approx([0.3, 0.02, 0.4])
    ensemble = ensemble_metrics(labels, {"a": a, "b": b}, tolerance=0.05,
                                rows=np.array([10, 11, 12, 13]))
    assert [r["row_number"] for r in ensemble["review_examples"]] == [12]   # gap 0.02
    assert [c["row_number"] for c in ensemble["closest_calls"]] == [11, 13]  # by gap
    assert ensemble["agreement_rate"] == 0.25
    assert "ferplus" not in ensemble
    # FER+ votes whose majority is 0, 1, 5, 3: the ensemble's 0, 1, 2, 3 gets three of four.
    votes = np.zeros((4, 10), np.int64)
    votes[np.arange(4), [0, 1, 5, 3]] = 6
    votes[:, 9] = 4
    with_votes = ensemble_metrics(labels, {"a": a, "b": b}, tolerance=0.05,
                                  ferplus_votes=votes)
    assert with_votes["ferplus"] == {"examples": 4, "accuracy_majority": 0.75}


def test_calibration_numbers_and_the_max_ece_gate(setup, tmp_path):
    """Every "good" face has confidence e^3/(e^3+6) and GOOD_FRACTION of them are right, so
    its ECE is |GOOD_FRACTION - that| with all faces in one bin (likewise "bad" with e^2).
    The tiny models serve no logits: "before" is computed from log p and equals "after"."""
    config = EvalConfig(min_accuracy={"good": 0.7, "bad": 0.1}, max_ece=0.1)
    result = run(setup, tmp_path / "serving", config, name="calibration")
    evaluation = json.loads(Path(result.evaluation_path).read_text())
    confidence = {"good": np.exp(3) / (np.exp(3) + 6), "bad": np.exp(2) / (np.exp(2) + 6)}
    accuracy = {"good": GOOD_FRACTION, "bad": 1 - GOOD_FRACTION}
    for name in ("good", "bad"):
        calibration = evaluation["models"][name]["calibration"]
        ece = abs(accuracy[name] - confidence[name])
        assert calibration["temperature"] is None              # not fitted: no record
        for when in ("before", "after"):
            assert calibration[when]["ece"] == pytest.approx(ece, rel=1e-5)
            filled = [b for b in calibration[when]["bins"] if b["count"]]
            assert len(filled) == 1 and filled[0]["count"] == 280
            assert filled[0]["lower"] < confidence[name] <= filled[0]["upper"]
        assert calibration["after"]["nll"] == pytest.approx(evaluation["models"][name]["loss"],
                                                            rel=1e-5)
    ensemble = evaluation["ensemble"]["calibration"]
    # The ensemble always follows "good" here (test_metrics_match_...): the same numbers.
    assert ensemble["after"]["ece"] == pytest.approx(abs(GOOD_FRACTION - confidence["good"]),
                                                     rel=1e-5)
    blessings = json.loads(Path(result.blessings_path).read_text())
    assert f"expected calibration error {abs(GOOD_FRACTION - confidence['good']):.3f} <= " \
        "max_ece 0.100" in " ".join(blessings["good"]["reasons"])
    assert blessings["bad"]["blessed"] is False
    assert f"calibration error (ECE) {abs(1 - GOOD_FRACTION - confidence['bad']):.3f} is " \
        "above max_ece 0.100" in blessings["bad"]["summary"]
    # A stricter bound holds back the better model too.
    strict = EvalConfig(min_accuracy={"good": 0.7}, max_ece=0.01)
    result = run(setup, tmp_path / "serving", strict, name="strict_ece", model_names=("good",))
    assert result.blessed == {"good": False}
    assert "is above max_ece 0.010" in result.summaries["good"]
