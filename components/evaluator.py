"""Evaluator: scores every trained model on the test split and decides which may ship.

For each model it runs the exported `serving_examples` signature (the exact graph that will
be served, transform included) over the raw test examples, and computes loss, accuracy,
per-class precision/recall/F1 and the confusion matrix. It scores the ensemble of all models
with the product's decision rule (`serving.ensemble.combine_batch`) and the version now in
serving on the same data, then applies the gates from `EvalConfig`:

- accuracy >= min_accuracy[name]           (a model with no threshold is never blessed)
- every class's recall >= min_class_recall (when set)
- accuracy >= served accuracy - max_regression (when a version is in serving)

Outputs (under `output_dir`): evaluation.json (all numbers), blessings.json
({name: {"blessed", "reasons"}}), report.html (self-contained, images inline).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from components.pusher import latest_served_version
from pipeline.artifacts import to_jsonable, write_json_atomic
from pipeline.config import EvalConfig
from pipeline.contract import (BLESSINGS_FILE, CLASS_NAMES, CLASS_NAMES_ES, EVALUATION_FILE,
    EXAMPLES_PATTERN, FEATURE_LABEL, HISTORY_FILE, REPORT_HTML, TRAINING_INFO_FILE,
    NUM_CLASSES)
from serving.ensemble import combine_batch

log = logging.getLogger(__name__)

SIGNATURE = "serving_examples"
BATCH_SIZE = 256
# Keras clips probabilities the same way before the log in categorical cross-entropy, so our
# loss matches the number training reported for a model that outputs an exact 0.
_LOSS_EPSILON = 1e-7


@dataclass
class EvalResult:
    evaluation_path: str
    blessings_path: str
    report_path: str
    test_examples: int
    accuracy: dict[str, float]
    blessed: dict[str, bool]
    ensemble_accuracy: Optional[float]


# ----------------------------------------------------------------------------- data

def _test_files(examples_dir: str) -> list[str]:
    files = sorted(str(p) for p in (Path(examples_dir) / "test").glob(EXAMPLES_PATTERN))
    if not files:
        raise FileNotFoundError(f"no test TFRecords under {examples_dir}/test")
    return files


def load_test_split(examples_dir: str) -> tuple[list[bytes], np.ndarray, list[str]]:
    """All serialized test examples, their labels, and the files read.

    The test split of FER-2013 is ~3,600 images (~9 MB), so holding it in memory lets every
    model (and the served versions) see exactly the same examples in the same order.
    """
    import tensorflow as tf

    files = _test_files(examples_dir)
    serialized = [record.numpy() for record in tf.data.TFRecordDataset(files)]
    if not serialized:
        raise ValueError(f"the test split under {examples_dir}/test is empty")
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64)}
    labels = np.concatenate([
        tf.io.parse_example(serialized[i:i + 4096], spec)[FEATURE_LABEL].numpy()
        for i in range(0, len(serialized), 4096)])
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"test labels outside 0..{NUM_CLASSES - 1} in {examples_dir}/test")
    return serialized, labels.astype(np.int64), files


def predict_probabilities(saved_model_dir: str, serialized: list[bytes]) -> np.ndarray:
    """Runs a SavedModel's `serving_examples` signature in batches; returns [n, 7] floats."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    if SIGNATURE not in loaded.signatures:
        raise ValueError(f"{saved_model_dir} has no {SIGNATURE!r} signature "
                         f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures[SIGNATURE]
    batches = [signature(examples=tf.constant(serialized[i:i + BATCH_SIZE]))["probabilities"]
               .numpy() for i in range(0, len(serialized), BATCH_SIZE)]
    probs = np.concatenate(batches).astype(np.float64)
    if probs.shape != (len(serialized), NUM_CLASSES):
        raise ValueError(f"{saved_model_dir}: probabilities have shape {probs.shape}, "
                         f"expected ({len(serialized)}, {NUM_CLASSES})")
    return probs


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # A class never predicted (or absent) scores 0, as sklearn does with zero_division=0.
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)),
                     where=denominator > 0)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    predictions = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions)
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _safe_divide(true_positives, matrix.sum(axis=0).astype(np.float64))
    recall = _safe_divide(true_positives, support.astype(np.float64))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    picked = np.clip(probs[np.arange(len(labels)), labels], _LOSS_EPSILON, 1.0)
    per_class = [
        {"class_id": k, "class_name": CLASS_NAMES[k], "class_name_es": CLASS_NAMES_ES[k],
         "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
         "support": int(support[k])}
        for k in range(NUM_CLASSES)]
    weights = support / support.sum()
    return {
        "loss": float(-np.log(picked).mean()),
        "accuracy": float((predictions == labels).mean()),
        "per_class": per_class,
        "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                      "f1": float(f1.mean())},
        "weighted_avg": {"precision": float(precision @ weights),
                         "recall": float(recall @ weights), "f1": float(f1 @ weights)},
        "confusion_matrix": matrix.tolist(),
    }


def ensemble_metrics(labels: np.ndarray, probs_by_model: Mapping[str, np.ndarray],
                     tolerance: float) -> dict[str, Any]:
    """The ensemble as the product will run it: accuracy, review rate, accuracy when automatic."""
    class_ids, _, review = combine_batch(probs_by_model, tolerance)
    correct = class_ids == labels
    automatic = ~review
    return {
        "models": list(probs_by_model),
        "tie_tolerance": tolerance,
        "accuracy": float(correct.mean()),
        "human_review_rate": float(review.mean()),
        "reviewed": int(review.sum()),
        "accuracy_non_reviewed": float(correct[automatic].mean()) if automatic.any() else None,
        "confusion_matrix": confusion_matrix(labels, class_ids).tolist(),
    }


# ----------------------------------------------------------------------------- gates

def gate(name: str, metrics: Mapping[str, Any], served: Optional[Mapping[str, Any]],
         config: EvalConfig) -> tuple[bool, list[str]]:
    """Applies the thresholds; returns (blessed, one human-readable reason per check)."""
    checks: list[tuple[bool, str]] = []
    accuracy = metrics["accuracy"]
    threshold = config.min_accuracy.get(name)
    if threshold is None:
        checks.append((False, f"no min_accuracy configured for {name!r}; refusing to bless "
                              "an ungated model"))
    else:
        ok = accuracy >= threshold
        checks.append((ok, f"accuracy {accuracy:.3f} {'>=' if ok else '<'} {threshold:.3f}"))

    if config.min_class_recall is not None:
        for row in metrics["per_class"]:
            ok = row["recall"] >= config.min_class_recall
            checks.append((ok, f"recall of {row['class_name']} ({row['class_name_es']}) "
                               f"{row['recall']:.3f} {'>=' if ok else '<'} "
                               f"{config.min_class_recall:.3f}"))

    if served is not None:
        floor = served["accuracy"] - config.max_regression
        ok = accuracy >= floor
        checks.append((ok, f"accuracy {accuracy:.3f} {'>=' if ok else '<'} {floor:.3f} "
                           f"(served version {served['version']}: {served['accuracy']:.3f} - "
                           f"max_regression {config.max_regression:.3f})"))
    else:
        checks.append((True, "no version in serving: regression check not applicable"))
    return all(ok for ok, _ in checks), [reason for _, reason in checks]


# ----------------------------------------------------------------------------- training info

def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else None


def _model_metadata(model_dir: str) -> dict[str, Any]:
    info = _read_json(Path(model_dir) / TRAINING_INFO_FILE)
    return {
        "model_dir": model_dir,
        "vgg_weights": (info or {}).get("vgg_weights"),
        "training_info": info,
        "history": _read_json(Path(model_dir) / HISTORY_FILE),
    }


# ----------------------------------------------------------------------------- entry point

def run_evaluator(examples_dir: str, model_dirs: Mapping[str, str], serving_root: str,
                  output_dir: str, config: EvalConfig) -> EvalResult:
    """Evaluates each model in `model_dirs` (name -> trainer output dir) on the test split."""
    if not model_dirs:
        raise ValueError("run_evaluator needs at least one model")
    serialized, labels, files = load_test_split(examples_dir)
    log.info("evaluating %d models on %d test examples", len(model_dirs), len(labels))

    models: dict[str, dict[str, Any]] = {}
    probs_by_model: dict[str, np.ndarray] = {}
    blessings: dict[str, dict[str, Any]] = {}
    for name, model_dir in model_dirs.items():
        probs = predict_probabilities(str(Path(model_dir) / SERVING_MODEL_DIR), serialized)
        probs_by_model[name] = probs
        metrics = classification_metrics(labels, probs)
        served = _evaluate_served(serving_root, name, serialized, labels)
        blessed, reasons = gate(name, metrics, served, config)
        blessings[name] = {"blessed": blessed, "reasons": reasons}
        models[name] = {**metrics, **_model_metadata(model_dir), "served": served,
                        "min_accuracy": config.min_accuracy.get(name),
                        "blessed": blessed, "reasons": reasons}
        log.info("%s: accuracy %.4f, blessed=%s (%s)", name, metrics["accuracy"], blessed,
                 "; ".join(reasons))

    ensemble = ensemble_metrics(labels, probs_by_model, config.tie_tolerance)
    evaluation = {
        "data": {"examples_dir": examples_dir, "split": "test", "files": files,
                 "test_examples": int(len(labels)),
                 "class_distribution": {CLASS_NAMES[k]: int((labels == k).sum())
                                        for k in range(NUM_CLASSES)}},
        "thresholds": asdict(config),
        "models": models,
        "ensemble": ensemble,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / EVALUATION_FILE, evaluation)
    write_json_atomic(out / BLESSINGS_FILE, blessings)
    (out / REPORT_HTML).write_text(render_report(to_jsonable(evaluation)))
    return EvalResult(
        evaluation_path=str(out / EVALUATION_FILE),
        blessings_path=str(out / BLESSINGS_FILE),
        report_path=str(out / REPORT_HTML),
        test_examples=int(len(labels)),
        accuracy={name: m["accuracy"] for name, m in models.items()},
        blessed={name: b["blessed"] for name, b in blessings.items()},
        ensemble_accuracy=ensemble["accuracy"],
    )


def _evaluate_served(serving_root: str, name: str, serialized: list[bytes],
                     labels: np.ndarray) -> Optional[dict[str, Any]]:
    """Accuracy and loss of the version now in serving, on the same examples; None if none."""
    latest = latest_served_version(serving_root, name) if serving_root else None
    if latest is None:
        return None
    version, path = latest
    metrics = classification_metrics(labels, predict_probabilities(path, serialized))
    return {"version": version, "path": path, "accuracy": metrics["accuracy"],
            "loss": metrics["loss"]}


# ----------------------------------------------------------------------------- report

def _png(figure) -> str:
    """A matplotlib figure as an inline <img> (base64 PNG), so the page is one file."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="chart" src="data:image/png;base64,{data}">'


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def _bilingual(k: int) -> str:
    return f"{CLASS_NAMES[k]} / {CLASS_NAMES_ES[k]}"


def _confusion_figure(matrix: list[list[int]], title: str) -> str:
    plt = _pyplot()
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    image = axes.imshow(counts, cmap="Blues")
    labels = [_bilingual(k) for k in range(NUM_CLASSES)]
    axes.set_xticks(range(NUM_CLASSES), labels, rotation=45, ha="right")
    axes.set_yticks(range(NUM_CLASSES), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                      color="white" if counts[i, j] > threshold else "black")
    figure.colorbar(image, ax=axes)
    return _png(figure)


def _history_figure(history: Mapping[str, Any], name: str) -> str:
    plt = _pyplot()
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 3.5))
    for axes, metric in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = history.get(key)
            if values:
                axes.plot(range(1, len(values) + 1), values, style, label=key)
        if history.get("best_epoch") is not None:
            axes.axvline(history["best_epoch"], color="grey", linestyle=":", label="best epoch")
        axes.set_xlabel("epoch")
        axes.set_title(f"{name}: {metric}")
        axes.legend()
    return _png(figure)


def _distribution_figure(distribution: Mapping[str, int]) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.bar([_bilingual(k) for k in range(NUM_CLASSES)],
             [distribution[CLASS_NAMES[k]] for k in range(NUM_CLASSES)])
    axes.tick_params(axis="x", rotation=30)
    axes.set_title("test examples per class")
    return _png(figure)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _model_section(name: str, model: Mapping[str, Any]) -> str:
    verdict = "BLESSED" if model["blessed"] else "NOT BLESSED"
    parts = [f"<h2>{html.escape(name)}: {verdict}</h2>",
             _table(["check"], [[reason] for reason in model["reasons"]]),
             _table(["model dir", "weights used (vgg_weights)", "test loss", "test accuracy",
                     "served version", "served accuracy"],
                    [[model["model_dir"], model["vgg_weights"], model["loss"],
                      model["accuracy"], (model["served"] or {}).get("version"),
                      (model["served"] or {}).get("accuracy")]])]
    rows = [[r["class_name"], r["class_name_es"], r["precision"], r["recall"], r["f1"],
             r["support"]] for r in model["per_class"]]
    for avg in ("macro_avg", "weighted_avg"):
        rows.append([avg.replace("_", " "), "", model[avg]["precision"], model[avg]["recall"],
                     model[avg]["f1"], sum(r["support"] for r in model["per_class"])])
    parts.append("<h3>Classification report</h3>")
    parts.append(_table(["class", "clase", "precision", "recall", "F1", "support"], rows))
    parts.append(_confusion_figure(model["confusion_matrix"], f"{name}: confusion matrix"))
    if model.get("history"):
        parts.append("<h3>Training curves</h3>")
        parts.append(_history_figure(model["history"], name))
    else:
        parts.append("<p>No history.json found: no training curves.</p>")
    return "\n".join(parts)


def render_report(evaluation: Mapping[str, Any]) -> str:
    """The self-contained HTML report (all images inline as base64 PNGs)."""
    data, ensemble = evaluation["data"], evaluation["ensemble"]
    thresholds = evaluation["thresholds"]
    sections = [
        "<h1>FER-2013 model evaluation</h1>",
        "<h2>Data evaluated on</h2>",
        _table(["examples dir", "split", "examples", "files"],
               [[data["examples_dir"], data["split"], data["test_examples"],
                 ", ".join(data["files"])]]),
        _table(["class", "clase", "examples"],
               [[CLASS_NAMES[k], CLASS_NAMES_ES[k], data["class_distribution"][CLASS_NAMES[k]]]
                for k in range(NUM_CLASSES)]),
        _distribution_figure(data["class_distribution"]),
        "<h2>Thresholds</h2>",
        _table(["setting", "value"], [[k, json.dumps(v)] for k, v in thresholds.items()]),
        "<h2>Verdicts</h2>",
        _table(["model", "blessed", "accuracy", "reasons"],
               [[name, m["blessed"], m["accuracy"], "; ".join(m["reasons"])]
                for name, m in evaluation["models"].items()]),
    ]
    sections += [_model_section(name, m) for name, m in evaluation["models"].items()]
    sections += [
        "<h2>Ensemble (the rule the product serves)</h2>",
        _table(["models", "tie tolerance", "accuracy", "human review rate",
                "accuracy when not reviewed"],
               [[", ".join(ensemble["models"]), ensemble["tie_tolerance"], ensemble["accuracy"],
                 ensemble["human_review_rate"], ensemble["accuracy_non_reviewed"]]]),
        _confusion_figure(ensemble["confusion_matrix"], "ensemble: confusion matrix"),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Evaluation</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
