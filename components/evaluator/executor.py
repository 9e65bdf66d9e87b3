"""Evaluator: scores every trained model on the test split and decides which may ship.

For each model it runs the exported `serving_examples` signature (the exact graph that will
be served, transform included) over the raw test examples, and computes loss, accuracy,
per-class precision/recall/F1 and the confusion matrix. It scores the ensemble of all models
with the product's decision rule (`fer_pipeline.core.ensemble.combine_batch`) and the version now in
serving on the same data, then applies the gates from `EvalConfig`:

- accuracy >= min_accuracy[name]           (a model with no threshold is never blessed)
- accuracy >= majority-class baseline + baseline_margin (always: a model that answers the
  test split's most frequent class for every face scores the baseline, so a threshold
  below it would bless a constant answer)
- every class's recall >= min_class_recall (when set)
- the expected calibration error of the served (calibrated) probabilities <= max_ece (when
  set; core/calibration.py: 15 bins, with NLL and ECE before and after temperature scaling
  per model and for the ensemble in evaluation.json's "calibration" entries)
- accuracy >= served accuracy - max_regression (when a version is in serving)

Every check compares with FER-2013's test labels unless evaluation.gate_labels is ferplus:
then accuracy, per-class recall, ECE, the majority-class baseline and the served version's
accuracy are all computed against FER+'s crowd majority (ferplus.ferplus_gate_metrics),
the labels a run trained on FER+ votes learned, and evaluation.json's "gate_labels" (and
each model's "gate" entry with those figures) says so. A run whose test examples carry no
votes then stops with a ConfigError before any model is run.

evaluation.json's "ensemble" combines every candidate; "ensemble_blessed" (when some but not
all are blessed) combines the blessed ones only, as the client will once the held-back ones
are not served.

Outputs (under `output_dir`): evaluation.json (all numbers), blessings.json
({name: {"blessed", "reasons", "summary"}}; `summary` is one line for a person) and
report.html (rendered by core/report_page.py; this package never imports matplotlib, so the
gate runs without it), and test_predictions.npz (each model's test-split probabilities, for
`fer-pipeline monitor`). All I/O goes through fer_pipeline.core.fileio, so the run root may be s3://.

The package by idea: split.py (the test split in memory), predictions.py (running the served
signature; test_predictions.npz), metrics.py (one model's classification metrics),
ensemble.py (the ensemble rule and the report's faces), ferplus.py (FER+ votes), gate.py
(the checks); this module runs them and writes the outputs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.components.evaluator.ensemble import confident_mistakes, ensemble_metrics
from fer_pipeline.components.evaluator.ferplus import ferplus_gate_metrics, with_votes
from fer_pipeline.components.evaluator.gate import gate
from fer_pipeline.components.evaluator.metrics import classification_metrics, majority_baseline
from fer_pipeline.components.evaluator.predictions import (predict_outputs,
    predict_probabilities, write_test_predictions)
from fer_pipeline.components.evaluator.split import TEST_SPLIT, TestSplit, load_test_split
from fer_pipeline.core.serving_root import latest_served_version
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import to_jsonable
from fer_pipeline.core.config import EvalConfig
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.contract import (BLESSINGS_FILE, CLASS_NAMES, EVALUATION_FILE,
    HISTORY_FILE, NUM_CLASSES, REPORT_HTML, SERVING_MODEL_DIR, TEST_PREDICTIONS_FILE,
    TRAINING_INFO_FILE)
from fer_pipeline.core.ferplus_votes import ferplus_metrics
from fer_pipeline.core.calibration import (ensemble_calibration, fitted_temperature,
                                           model_calibration)

__all__ = ["run_evaluator", "EvalResult"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    evaluation_path: str
    blessings_path: str
    report_path: str
    test_examples: int
    accuracy: dict[str, float]
    blessed: dict[str, bool]
    ensemble_accuracy: Optional[float]
    summaries: Optional[dict[str, str]] = None   # model -> one line: blessed or why not


# ----------------------------------------------------------------------------- training info

def _read_json_if_present(path: str) -> Optional[dict[str, Any]]:
    return fileio.read_json(path) if fileio.exists(path) else None


def _model_metadata(model_dir: str) -> dict[str, Any]:
    info = _read_json_if_present(fileio.join(model_dir, TRAINING_INFO_FILE))
    return {
        "model_dir": model_dir,
        "vgg_weights": (info or {}).get("vgg_weights"),
        "training_info": info,
        "history": _read_json_if_present(fileio.join(model_dir, HISTORY_FILE)),
    }


# ----------------------------------------------------------------------------- entry point

def run_evaluator(examples_dir: str, model_dirs: Mapping[str, str], serving_root: str,
                  output_dir: str, config: EvalConfig) -> EvalResult:
    """Evaluates each model in `model_dirs` (name -> trainer output dir) on the test split."""
    if not model_dirs:
        raise ValueError("run_evaluator needs at least one model")
    split = load_test_split(examples_dir)
    if config.gate_labels == "ferplus" and split.votes is None:
        raise ConfigError(
            f"evaluation.gate_labels is ferplus but the test examples under {examples_dir} "
            "carry no FER+ votes: ingest them with ingest.ferplus_labels (FER+'s "
            "fer2013new.csv) or set evaluation.gate_labels: fer2013")
    gate_votes = split.votes if config.gate_labels == "ferplus" else None
    labels = split.labels
    baseline = majority_baseline(labels)
    log.info("evaluating %d models on %d test examples", len(model_dirs), len(labels))

    answers = {name: predict_outputs(fileio.join(model_dir, SERVING_MODEL_DIR), split.serialized)
               for name, model_dir in model_dirs.items()}
    # The served probabilities are the calibrated ones: everything below (metrics, the
    # ensemble rule, the monitor's test predictions) uses them; the logits give "before".
    probs_by_model = {name: probs for name, (probs, _) in answers.items()}
    models: dict[str, dict[str, Any]] = {}
    blessings: dict[str, dict[str, Any]] = {}
    for name, model_dir in model_dirs.items():
        metadata = _model_metadata(model_dir)
        metrics = classification_metrics(labels, probs_by_model[name])
        metrics["calibration"] = model_calibration(
            labels, answers[name][1], probs_by_model[name],
            fitted_temperature(metadata["training_info"]))
        served = _evaluate_served(serving_root, name, split.serialized, labels, gate_votes)
        judged = (metrics, served, baseline)
        if gate_votes is not None:
            against = ferplus_gate_metrics(gate_votes, probs_by_model[name], answers[name][1],
                                           fitted_temperature(metadata["training_info"]))
            judged = (against, served and {**served, "accuracy": served["ferplus_accuracy"]},
                      against["majority_baseline"])
        blessed, reasons, summary = gate(name, judged[0], judged[1], config, judged[2])
        blessings[name] = {"blessed": blessed, "reasons": reasons, "summary": summary}
        models[name] = {**metrics, **metadata, "served": served,
                        "min_accuracy": config.min_accuracy.get(name),
                        "blessed": blessed, "reasons": reasons, "summary": summary,
                        "mistakes": with_votes(confident_mistakes(name, split, probs_by_model),
                                               split.votes)}
        if split.votes is not None:
            models[name]["ferplus"] = ferplus_metrics(split.votes, probs_by_model[name])
        if gate_votes is not None:
            models[name]["gate"] = _gate_record(*judged)
        log.info("%s: accuracy %.4f, blessed=%s (%s)", name, metrics["accuracy"], blessed,
                 "; ".join(reasons))

    ensemble = ensemble_metrics(labels, probs_by_model, config.tie_tolerance, split.rows,
                                ferplus_votes=split.votes)
    ensemble["calibration"] = ensemble_calibration(
        labels, {name: logits for name, (_, logits) in answers.items()}, probs_by_model,
        config.tie_tolerance)
    # What the client will combine once held-back models are left out of serving.
    blessed_names = [name for name in model_dirs if blessings[name]["blessed"]]
    ensemble_blessed = (ensemble_metrics(
        labels, {name: probs_by_model[name] for name in blessed_names}, config.tie_tolerance,
        split.rows, review_faces=0, closest_calls=0)
        if 0 < len(blessed_names) < len(model_dirs) else None)
    evaluation = {
        "data": {"examples_dir": examples_dir, "split": TEST_SPLIT, "files": split.files,
                 "test_examples": int(len(labels)),
                 "class_distribution": {CLASS_NAMES[k]: int((labels == k).sum())
                                        for k in range(NUM_CLASSES)},
                 "majority_baseline": baseline},
        "gate_labels": config.gate_labels,
        "thresholds": asdict(config),
        "serving_root": serving_root,
        "models": models,
        "ensemble": ensemble,
        "ensemble_blessed": ensemble_blessed,
    }
    paths = _write_outputs(output_dir, evaluation, blessings, split)
    write_test_predictions(fileio.join(output_dir, TEST_PREDICTIONS_FILE), probs_by_model)
    return EvalResult(
        evaluation_path=paths[EVALUATION_FILE],
        blessings_path=paths[BLESSINGS_FILE],
        report_path=paths[REPORT_HTML],
        test_examples=int(len(labels)),
        accuracy={name: m["accuracy"] for name, m in models.items()},
        blessed={name: b["blessed"] for name, b in blessings.items()},
        ensemble_accuracy=ensemble["accuracy"],
        summaries={name: b["summary"] for name, b in blessings.items()},
    )


def _write_outputs(output_dir: str, evaluation: dict[str, Any],
                   blessings: dict[str, dict[str, Any]], split: TestSplit) -> dict[str, str]:
    # Imported here: rendering needs matplotlib, the gate above does not.
    from fer_pipeline.core.report_page import faces_shown, render_report

    paths = {name: fileio.join(output_dir, name)
             for name in (EVALUATION_FILE, BLESSINGS_FILE, REPORT_HTML)}
    fileio.write_json(paths[EVALUATION_FILE], evaluation)
    fileio.write_json(paths[BLESSINGS_FILE], blessings)
    evaluation = to_jsonable(evaluation)
    faces = {i: split.pixels[i] for i in faces_shown(evaluation)}
    fileio.write_text(paths[REPORT_HTML], render_report(evaluation, faces))
    return paths


def _evaluate_served(serving_root: str, name: str, serialized: list[bytes],
                     labels: np.ndarray, votes: Optional[np.ndarray] = None
                     ) -> Optional[dict[str, Any]]:
    """Accuracy and loss of the version now in serving, on the same examples (with `votes`,
    its accuracy against FER+'s majority too); None if none."""
    latest = latest_served_version(serving_root, name) if serving_root else None
    if latest is None:
        return None
    version, path = latest
    probs = predict_probabilities(path, serialized)
    metrics = classification_metrics(labels, probs)
    served = {"version": version, "path": path, "accuracy": metrics["accuracy"],
              "loss": metrics["loss"]}
    if votes is not None:
        served["ferplus_accuracy"] = ferplus_metrics(votes, probs)["accuracy_majority"]
    return served


def _gate_record(metrics: Mapping[str, Any], served: Optional[Mapping[str, Any]],
                 baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The figures the gate compared when it judged against FER+'s majority."""
    return {"labels": "ferplus", "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
            "ece": metrics["calibration"]["after"]["ece"], "majority_baseline": baseline,
            "served_accuracy": served["accuracy"] if served else None}
