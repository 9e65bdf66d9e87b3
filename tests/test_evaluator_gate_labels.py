"""evaluation.gate_labels: the gate judging against FER+'s majority instead of FER-2013's labels.

tests/test_evaluator.py's tiny models and test split, with FER+ votes added: on the first
80 % of faces (where "good", shift 0, matches FER-2013's label) the crowd's majority is what
"bad" (shift 6) answers, and on the other 20 % it is what "good" answers. So against
FER-2013 good scores 0.8 and bad 0.2, and against FER+'s majority the other way round: every
check the gate makes must flip with the labels it is told to use.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fer_pipeline.core.config import EvalConfig, load_config
from fer_pipeline.core.contract import NUM_CLASSES
from fer_pipeline.core.errors import ConfigError
from tests.test_evaluator import GOOD_FRACTION, make_model_dir, make_split_arrays

N = 280


def _example(label: int, pixels: np.ndarray, row: int, votes: list[int]):
    import tensorflow as tf

    def ints(*v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    def raw(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "emotion": ints(label), "pixels": raw(pixels.astype(np.uint8).tobytes()),
        "usage": raw(b"PrivateTest"), "row_number": ints(row), "source_row": ints(row),
        "augmentation": raw(b"original"), "ferplus_votes": ints(*votes),
        "ferplus_majority": ints(int(np.argmax(votes[:NUM_CLASSES])))}))


@pytest.fixture(scope="module")
def voted(tmp_path_factory):
    """(root, FER-2013 labels, FER+ majority, model dirs): one shard, in file order."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("gate_labels")
    labels, pixels = make_split_arrays(N)
    shown = pixels[:, :NUM_CLASSES].argmax(axis=1)
    cut = int(round(N * GOOD_FRACTION))
    majority = np.where(np.arange(N) < cut, (shown + 6) % NUM_CLASSES, shown)
    folder = root / "examples" / "test"
    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "examples-00000-of-00001.tfrecord")) as writer:
        for i in range(N):
            votes = [0] * 10
            votes[labels[i]] += 4        # a minority for FER-2013's label ...
            votes[majority[i]] += 6      # ... and the crowd's majority
            writer.write(_example(int(labels[i]), pixels[i], i + 2, votes)
                         .SerializeToString())
    models = root / "models"
    dirs = {"good": make_model_dir(models, "good", shift=0, scale=3.0),
            "bad": make_model_dir(models, "bad", shift=6, scale=2.0, history=False)}
    return root, labels, majority, dirs


def _run(voted, config, out: Path, serving: Path, names=("good", "bad")):
    from fer_pipeline.components.evaluator import run_evaluator

    root, _, _, dirs = voted
    result = run_evaluator(str(root / "examples"), {n: dirs[n] for n in names}, str(serving),
                           str(out), config)
    return (result, json.loads(Path(result.evaluation_path).read_text()),
            json.loads(Path(result.blessings_path).read_text()))


def test_the_accuracy_threshold_follows_the_labels(voted, tmp_path):
    thresholds = {"good": 0.7, "bad": 0.7}
    result, evaluation, _ = _run(voted, EvalConfig(min_accuracy=thresholds),
                                 tmp_path / "fer2013", tmp_path / "serving")
    assert result.blessed == {"good": True, "bad": False}
    assert evaluation["gate_labels"] == "fer2013" and "gate" not in evaluation["models"]["good"]
    assert 'data-gate-labels="fer2013"' in Path(result.report_path).read_text()

    config = EvalConfig(min_accuracy=thresholds, gate_labels="ferplus")
    result, evaluation, blessings = _run(voted, config, tmp_path / "ferplus",
                                         tmp_path / "serving")
    assert result.blessed == {"good": False, "bad": True}
    good = evaluation["models"]["good"]
    # FER-2013's figures stay what they were; the gate's own are FER+'s.
    assert good["accuracy"] == pytest.approx(GOOD_FRACTION)
    assert good["gate"]["labels"] == evaluation["gate_labels"] == "ferplus"
    assert good["gate"]["accuracy"] == pytest.approx(1 - GOOD_FRACTION)
    assert good["gate"]["accuracy"] == good["ferplus"]["accuracy_majority"]
    assert evaluation["models"]["bad"]["gate"]["accuracy"] == pytest.approx(GOOD_FRACTION)
    assert "FER+ majority accuracy 0.200 < 0.700" in blessings["good"]["reasons"]
    baseline = evaluation["models"]["good"]["gate"]["majority_baseline"]["accuracy"]
    assert blessings["good"]["summary"] == (
        "good held back: test FER+ majority accuracy 0.20 is below its threshold 0.70; "
        "test FER+ majority accuracy 0.20 does not beat the majority-class baseline "
        f"{baseline:.2f} by 0.05")
    assert blessings["bad"]["summary"] == (
        "bad blessed: test FER+ majority accuracy 0.80 passed all 3 checks")
    page = Path(result.report_path).read_text()
    assert 'data-gate-labels="ferplus"' in page and "FER+ majority accuracy" in page
    assert 'data-path="models/bad/gate/accuracy"' in page


def test_the_baseline_recall_ece_and_regression_follow_the_labels(voted, tmp_path):
    _, _, majority, dirs = voted
    # Recall alone decides: low thresholds, no baseline margin to speak of.
    recall = dict(min_accuracy={"good": 0.1, "bad": 0.1}, min_class_recall=0.5,
                  baseline_margin=-0.5)
    result, _, _ = _run(voted, EvalConfig(**recall), tmp_path / "r1", tmp_path / "serving")
    assert result.blessed == {"good": True, "bad": False}
    result, evaluation, blessings = _run(voted, EvalConfig(**recall, gate_labels="ferplus"),
                                         tmp_path / "r2", tmp_path / "serving")
    assert result.blessed == {"good": False, "bad": True}
    assert "recall of" in blessings["good"]["summary"]
    assert "against FER+'s majority" in blessings["good"]["summary"]
    # The baseline the gate compared is FER+'s majority's most frequent class.
    counts = np.bincount(majority, minlength=NUM_CLASSES)
    assert evaluation["models"]["good"]["gate"]["majority_baseline"]["accuracy"] == \
        pytest.approx(counts.max() / len(majority))

    # ECE: good's confidence e^3/(e^3+6) = 0.77 is right 80 % of the time against FER-2013
    # (ECE 0.03) but 20 % against FER+'s majority (ECE 0.57).
    ece = dict(min_accuracy={"good": 0.1}, max_ece=0.1, baseline_margin=-0.5)
    result, _, _ = _run(voted, EvalConfig(**ece), tmp_path / "e1", tmp_path / "serving",
                        ("good",))
    assert result.blessed == {"good": True}
    result, evaluation, _ = _run(voted, EvalConfig(**ece, gate_labels="ferplus"),
                                 tmp_path / "e2", tmp_path / "serving", ("good",))
    confidence = np.exp(3) / (np.exp(3) + 6)
    assert evaluation["models"]["good"]["gate"]["ece"] == pytest.approx(
        confidence - (1 - GOOD_FRACTION), rel=1e-5)
    assert result.blessed == {"good": False}
    assert "calibration error (ECE) against FER+'s majority" in result.summaries["good"]

    # Regression: "good" in serving as bad's version 4. Against FER-2013 bad (0.2) regresses
    # from it (0.8); against FER+'s majority it is the other way round.
    serving = tmp_path / "regress_serving"
    shutil.copytree(Path(dirs["good"]) / "serving_model", serving / "bad" / "4")
    regress = dict(min_accuracy={"bad": 0.1}, baseline_margin=-0.5)
    result, _, _ = _run(voted, EvalConfig(**regress), tmp_path / "g1", serving, ("bad",))
    assert result.blessed == {"bad": False}
    result, evaluation, blessings = _run(voted, EvalConfig(**regress, gate_labels="ferplus"),
                                         tmp_path / "g2", serving, ("bad",))
    assert result.blessed == {"bad": True}
    assert evaluation["models"]["bad"]["gate"]["served_accuracy"] == pytest.approx(
        1 - GOOD_FRACTION)
    assert any(r.startswith("FER+ majority accuracy 0.800 >= 0.190 (served version 4: 0.200")
               for r in blessings["bad"]["reasons"])


def test_ferplus_labels_without_votes_is_a_one_line_config_error(tmp_path):
    from fer_pipeline.components.evaluator import run_evaluator
    from tests.test_evaluator import write_test_split

    write_test_split(tmp_path / "examples", n=20)
    model = make_model_dir(tmp_path / "models", "good")
    with pytest.raises(ConfigError) as error:
        run_evaluator(str(tmp_path / "examples"), {"good": model}, "",
                      str(tmp_path / "evaluation"),
                      EvalConfig(min_accuracy={"good": 0.5}, gate_labels="ferplus"))
    message = str(error.value)
    assert "\n" not in message
    assert "evaluation.gate_labels is ferplus" in message and "no FER+ votes" in message
    assert not (tmp_path / "evaluation").exists()       # stopped before evaluating
    with pytest.raises(ConfigError, match="gate_labels"):
        load_config(overrides={"evaluation": {"gate_labels": "fer+"}})
    assert load_config(overrides={"evaluation": {"gate_labels": "ferplus"}}
                       ).evaluation.gate_labels == "ferplus"


def test_a_run_that_ingests_without_votes_stops_before_any_step(tmp_path):
    from fer_pipeline.pipeline.runner import PipelineError, RunContext, run_pipeline

    config = load_config(overrides={"evaluation": {"gate_labels": "ferplus"}})
    ctx = RunContext(data_paths=[str(tmp_path / "fer.csv")], run_root=str(tmp_path / "run"),
                     config=config)
    with pytest.raises(ConfigError) as error:
        run_pipeline(ctx)
    assert "\n" not in str(error.value) and "ingest.ferplus_labels is not set" in str(error.value)
    assert not (tmp_path / "run").exists()
    # Evaluating an earlier run's examples: the evaluator judges those (the test above), so
    # this check stays out of the way and the missing input is what stops it here.
    with pytest.raises(PipelineError, match="needs 'ingest.examples'"):
        run_pipeline(ctx, steps=["evaluate"])
