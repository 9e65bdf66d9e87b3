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

evaluation.json's "ensemble" combines every candidate; "ensemble_blessed" (when some but not
all are blessed) combines the blessed ones only, as the client will once the held-back ones
are not served.

Outputs (under `output_dir`): evaluation.json (all numbers), blessings.json
({name: {"blessed", "reasons", "summary"}}; `summary` is one line for a person) and
report.html (rendered by core/report_page.py; this module never imports matplotlib, so the
gate runs without it), and test_predictions.npz (each model's test-split probabilities, for
`fer-pipeline monitor`). All I/O goes through fer_pipeline.core.fileio, so the run root may be s3://.
"""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.core.serving_root import latest_served_version
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import to_jsonable
from fer_pipeline.core.config import EvalConfig
from fer_pipeline.core.contract import (BLESSINGS_FILE, CLASS_NAMES, EVALUATION_FILE,
    EXAMPLES_PATTERN, FEATURE_LABEL, FEATURE_PIXELS, FEATURE_ROW, HISTORY_FILE, IMAGE_SIZE,
    NUM_CLASSES, OUTPUT_PROBABILITIES, REPORT_HTML, SERVING_MODEL_DIR, SIGNATURE_EXAMPLES,
    TEST_PREDICTIONS_FILE, TRAINING_INFO_FILE, INPUT_EXAMPLES, OUTPUT_LOGITS,
    CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES)
from fer_pipeline.core.ferplus_votes import (FERPLUS_CLASS_COUNTS, ferplus_metrics,
                                             votes_by_class, votes_of)
from fer_pipeline.core.calibration import (ensemble_calibration, fitted_temperature,
                                           logits_from_probabilities, model_calibration)
from fer_pipeline.core.ensemble import combine_batch
from fer_pipeline.core.errors import InputDataError, MissingInputError

__all__ = ["run_evaluator", "EvalResult"]

log = logging.getLogger(__name__)

TEST_SPLIT = "test"
BATCH_SIZE = 256
# Keras clips probabilities the same way before the log in categorical cross-entropy, so our
# loss matches the number training reported for a model that outputs an exact 0.
_LOSS_EPSILON = 1e-7
# How many faces the report shows: the most confident mistakes per true class and model,
# and the faces the ensemble sent to human review. Bounded so the page stays small.
MISTAKES_PER_CLASS = 5
REVIEW_FACES = 24
# Disagreements the ensemble decided alone, smallest confidence gap first: what a person
# looks at to judge tie_tolerance (and all the report can show when nothing went to review).
CLOSEST_CALLS = 12


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


@dataclass
class TestSplit:
    """The test split in memory, in file order (every model sees the same examples)."""
    serialized: list[bytes]
    labels: np.ndarray       # int64 [n]
    rows: np.ndarray         # int64 [n], the CSV line numbers
    pixels: np.ndarray       # uint8 [n, 48, 48]
    files: list[str]
    votes: Optional[np.ndarray] = None   # int64 [n, 10] FER+ votes, when ingest joined them


# ----------------------------------------------------------------------------- data

def _test_files(examples_dir: str) -> list[str]:
    files = fileio.glob(fileio.join(examples_dir, TEST_SPLIT, EXAMPLES_PATTERN))
    if not files:
        raise MissingInputError(f"no test TFRecords under {examples_dir}/{TEST_SPLIT}")
    return files


def load_test_split(examples_dir: str) -> TestSplit:
    """All serialized test examples with their labels, row numbers and pixels.

    The test split of FER-2013 is ~3,600 images (~9 MB), so holding it in memory lets every
    model (and the served versions) see exactly the same examples in the same order.
    """
    import tensorflow as tf

    files = _test_files(examples_dir)
    serialized = [record.numpy() for record in tf.data.TFRecordDataset(files)]
    if not serialized:
        raise InputDataError(f"the test split under {examples_dir}/{TEST_SPLIT} is empty")
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_ROW: tf.io.FixedLenFeature([], tf.int64, default_value=0),
            FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string)}
    labels, rows, pixels = [], [], []
    for start in range(0, len(serialized), 4096):
        parsed = tf.io.parse_example(serialized[start:start + 4096], spec)
        labels.append(parsed[FEATURE_LABEL].numpy())
        rows.append(parsed[FEATURE_ROW].numpy())
        pixels.append(np.stack([np.frombuffer(raw, np.uint8) for raw in
                                parsed[FEATURE_PIXELS].numpy()]))
    label_array = np.concatenate(labels).astype(np.int64)
    if label_array.min() < 0 or label_array.max() >= NUM_CLASSES:
        raise InputDataError(f"test labels outside 0..{NUM_CLASSES - 1} in {examples_dir}/test")
    return TestSplit(serialized, label_array, np.concatenate(rows).astype(np.int64),
                     np.concatenate(pixels).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), files,
                     votes_of(serialized))


def predict_probabilities(saved_model_dir: str, serialized: list[bytes]) -> np.ndarray:
    """Runs a SavedModel's `serving_examples` signature in batches; returns [n, 7] floats."""
    return predict_outputs(saved_model_dir, serialized)[0]


def predict_outputs(saved_model_dir: str, serialized: list[bytes]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(the served, calibrated probabilities, the logits) of `serving_examples`; a model
    exported before calibration has no logits output: log p stands in (core/calibration.py)."""
    import tensorflow as tf

    fileio.register_filesystem(saved_model_dir)
    loaded = tf.saved_model.load(saved_model_dir)
    if SIGNATURE_EXAMPLES not in loaded.signatures:
        raise ValueError(f"{saved_model_dir} has no {SIGNATURE_EXAMPLES!r} signature "
                         f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures[SIGNATURE_EXAMPLES]
    answers = [signature(**{INPUT_EXAMPLES: tf.constant(serialized[i:i + BATCH_SIZE])})
               for i in range(0, len(serialized), BATCH_SIZE)]
    probs = np.concatenate([a[OUTPUT_PROBABILITIES].numpy() for a in answers]).astype(np.float64)
    # 7 classes (FER-2013) or 8 (FER+ with contempt): the width says which.
    if probs.shape[0] != len(serialized) or probs.shape[1] not in FERPLUS_CLASS_COUNTS:
        raise ValueError(f"{saved_model_dir}: probabilities have shape {probs.shape}, "
                         f"expected ({len(serialized)}, {NUM_CLASSES} or 8)")
    logits = (np.concatenate([a[OUTPUT_LOGITS].numpy() for a in answers]).astype(np.float64)
              if answers and OUTPUT_LOGITS in answers[0] else logits_from_probabilities(probs))
    return probs, logits


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # A class never predicted (or absent) scores 0, as sklearn does with zero_division=0.
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)),
                     where=denominator > 0)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    predictions = probs.argmax(axis=1)
    width = probs.shape[1]     # 8 for a FER+ model with contempt, which FER-2013 never labels
    matrix = confusion_matrix(labels, predictions, width)
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _safe_divide(true_positives, matrix.sum(axis=0).astype(np.float64))
    recall = _safe_divide(true_positives, support.astype(np.float64))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    picked = np.clip(probs[np.arange(len(labels)), labels], _LOSS_EPSILON, 1.0)
    per_class = [
        {"class_id": k, "class_name": CLASS_NAMES_FERPLUS[k],
         "class_name_es": CLASS_NAMES_FERPLUS_ES[k],
         "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
         "support": int(support[k])}
        for k in range(width)]
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


def majority_baseline(labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of answering the test split's most frequent class for every face."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    majority = int(counts.argmax())
    return {"class_id": majority, "class_name": CLASS_NAMES[majority],
            "accuracy": float(counts[majority] / counts.sum())}


def _answers(index: int, probs_by_model: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: {"class_id": int(probs[index].argmax()),
                   "class_name": CLASS_NAMES_FERPLUS[int(probs[index].argmax())],
                   "confidence": float(probs[index].max())}
            for name, probs in probs_by_model.items()}


def confident_mistakes(model: str, split: TestSplit, probs_by_model: Mapping[str, np.ndarray],
                       per_class: int = MISTAKES_PER_CLASS) -> dict[str, list[dict[str, Any]]]:
    """For each true class, `model`'s most confident wrong answers, with every model's answer.

    `index` is the example's position in the test split (file order), `row_number` its
    CSV line.
    """
    probs = probs_by_model[model]
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    found: dict[str, list[dict[str, Any]]] = {}
    for k in range(NUM_CLASSES):
        wrong = np.flatnonzero((split.labels == k) & (predicted != k))
        # Stable sort on -confidence: ties keep file order, so the gallery is reproducible.
        ranked = wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class]
        found[CLASS_NAMES[k]] = [
            {"index": int(i), "row_number": int(split.rows[i]), "true_class": CLASS_NAMES[k],
             "answers": _answers(int(i), probs_by_model)} for i in ranked]
    return found


def confidence_gaps(probs_by_model: Mapping[str, np.ndarray],
                    class_ids: np.ndarray) -> np.ndarray:
    """Per face: the ensemble's confidence minus the most confident vote for another class
    (inf where every model agrees), the gap the review rule compares with tie_tolerance."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs_by_model.values()])
    votes, confs = stacked.argmax(axis=2), stacked.max(axis=2)
    chosen = confs.max(axis=0)
    rival = np.where(votes != class_ids, confs, -np.inf).max(axis=0)
    return np.where(np.isfinite(rival), chosen - rival, np.inf)


def _ensemble_face(i: int, labels: np.ndarray, rows: Optional[np.ndarray],
                   class_ids: np.ndarray, gaps: np.ndarray,
                   probs_by_model: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {"index": int(i), "row_number": int(rows[i]) if rows is not None else None,
            "true_class": CLASS_NAMES[int(labels[i])],
            "decision": CLASS_NAMES_FERPLUS[int(class_ids[i])],
            "gap": float(gaps[i]), "answers": _answers(int(i), probs_by_model)}


def ensemble_metrics(labels: np.ndarray, probs_by_model: Mapping[str, np.ndarray],
                     tolerance: float, rows: Optional[np.ndarray] = None,
                     review_faces: int = REVIEW_FACES,
                     closest_calls: int = CLOSEST_CALLS) -> dict[str, Any]:
    """The ensemble as the product will run it: accuracy, agreement, review rate, accuracy
    when automatic, the first `review_faces` faces it sends to a person and the
    `closest_calls` disagreements it decided alone with the smallest confidence gaps."""
    class_ids, _, review = combine_batch(probs_by_model, tolerance)
    correct = class_ids == labels
    automatic = ~review
    votes = np.stack([p.argmax(axis=1) for p in probs_by_model.values()])
    agree = (votes == votes[0]).all(axis=0)
    reviewed = np.flatnonzero(review)
    gaps = confidence_gaps(probs_by_model, class_ids)
    decided = np.flatnonzero(automatic & np.isfinite(gaps))
    closest = decided[np.argsort(gaps[decided], kind="stable")][:closest_calls]
    return {
        "models": list(probs_by_model),
        "tie_tolerance": tolerance,
        "accuracy": float(correct.mean()),
        "agreement_rate": float(agree.mean()),
        "human_review_rate": float(review.mean()),
        "reviewed": int(review.sum()),
        "accuracy_non_reviewed": float(correct[automatic].mean()) if automatic.any() else None,
        "confusion_matrix": confusion_matrix(
            labels, class_ids, next(iter(probs_by_model.values())).shape[1]).tolist(),
        "review_examples": [_ensemble_face(i, labels, rows, class_ids, gaps, probs_by_model)
                            for i in reviewed[:review_faces]],
        "closest_calls": [_ensemble_face(i, labels, rows, class_ids, gaps, probs_by_model)
                          for i in closest],
    }


# ----------------------------------------------------------------------------- gates

@dataclass
class Check:
    passed: bool
    reason: str          # what was compared, for the reasons list
    failure: str = ""    # the one-line "why held back" when this check fails


def _threshold_check(name: str, accuracy: float, config: EvalConfig) -> Check:
    threshold = config.min_accuracy.get(name)
    if threshold is None:
        return Check(False, f"no min_accuracy configured for {name!r}; refusing to bless "
                            "an ungated model",
                     f"no min_accuracy configured for {name}")
    ok = accuracy >= threshold
    return Check(ok, f"accuracy {accuracy:.3f} {'>=' if ok else '<'} {threshold:.3f}",
                 f"test accuracy {accuracy:.2f} is below its threshold {threshold:.2f}")


def _baseline_check(accuracy: float, baseline: Mapping[str, Any], margin: float) -> Check:
    floor = baseline["accuracy"] + margin
    ok = accuracy >= floor
    return Check(ok, f"accuracy {accuracy:.3f} {'>=' if ok else '<'} {floor:.3f} "
                     f"(majority-class baseline {baseline['accuracy']:.3f}, always "
                     f"{baseline['class_name']!r}, + baseline_margin {margin:.3f})",
                 f"test accuracy {accuracy:.2f} does not beat the majority-class baseline "
                 f"{baseline['accuracy']:.2f} by {margin:.2f}")


def _recall_checks(metrics: Mapping[str, Any], floor: float) -> list[Check]:
    checks = []
    for row in metrics["per_class"]:
        if row["class_id"] >= NUM_CLASSES and not row["support"]:
            continue   # FER+'s contempt: FER-2013's test labels never name it
        ok = row["recall"] >= floor
        checks.append(Check(ok, f"recall of {row['class_name']} ({row['class_name_es']}) "
                                f"{row['recall']:.3f} {'>=' if ok else '<'} {floor:.3f}",
                            f"recall of {row['class_name']} {row['recall']:.2f} is below "
                            f"{floor:.2f}"))
    return checks


def _regression_check(accuracy: float, served: Optional[Mapping[str, Any]],
                      max_regression: float) -> Check:
    if served is None:
        return Check(True, "no version in serving: regression check not applicable")
    floor = served["accuracy"] - max_regression
    ok = accuracy >= floor
    return Check(ok, f"accuracy {accuracy:.3f} {'>=' if ok else '<'} {floor:.3f} "
                     f"(served version {served['version']}: {served['accuracy']:.3f} - "
                     f"max_regression {max_regression:.3f})",
                 f"test accuracy {accuracy:.2f} regresses from served version "
                 f"{served['version']} ({served['accuracy']:.2f}) by more than "
                 f"{max_regression:.2f}")


def _ece_check(calibration: Mapping[str, Any], max_ece: float) -> Check:
    """The served (calibrated) probabilities' expected calibration error on the test split."""
    ece = calibration["after"]["ece"]
    ok = ece <= max_ece
    return Check(ok, f"expected calibration error {ece:.3f} {'<=' if ok else '>'} max_ece "
                     f"{max_ece:.3f} (calibrated probabilities, {calibration['bins_count']} bins)",
                 f"calibration error (ECE) {ece:.3f} is above max_ece {max_ece:.3f}")


def gate(name: str, metrics: Mapping[str, Any], served: Optional[Mapping[str, Any]],
         config: EvalConfig, baseline: Optional[Mapping[str, Any]] = None
         ) -> tuple[bool, list[str], str]:
    """Applies the thresholds.

    Returns (blessed, one human-readable reason per check, a one-line summary naming the
    model and, when it is held back, every check it failed).
    """
    accuracy = metrics["accuracy"]
    checks = [_threshold_check(name, accuracy, config)]
    if baseline is not None:
        checks.append(_baseline_check(accuracy, baseline, config.baseline_margin))
    if config.min_class_recall is not None:
        checks += _recall_checks(metrics, config.min_class_recall)
    if config.max_ece is not None and "calibration" in metrics:
        checks.append(_ece_check(metrics["calibration"], config.max_ece))
    checks.append(_regression_check(accuracy, served, config.max_regression))
    blessed = all(c.passed for c in checks)
    return blessed, [c.reason for c in checks], _summary(name, accuracy, checks, blessed)


def _summary(name: str, accuracy: float, checks: list[Check], blessed: bool) -> str:
    if blessed:
        return f"{name} blessed: test accuracy {accuracy:.2f} passed all {len(checks)} checks"
    return f"{name} held back: " + "; ".join(c.failure for c in checks if not c.passed)


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
        metrics = classification_metrics(labels, probs_by_model[name])
        metrics["calibration"] = model_calibration(
            labels, answers[name][1], probs_by_model[name], fitted_temperature(
                _read_json_if_present(fileio.join(model_dir, TRAINING_INFO_FILE))))
        served = _evaluate_served(serving_root, name, split.serialized, labels)
        blessed, reasons, summary = gate(name, metrics, served, config, baseline)
        blessings[name] = {"blessed": blessed, "reasons": reasons, "summary": summary}
        models[name] = {**metrics, **_model_metadata(model_dir), "served": served,
                        "min_accuracy": config.min_accuracy.get(name),
                        "blessed": blessed, "reasons": reasons, "summary": summary,
                        "mistakes": with_votes(confident_mistakes(name, split, probs_by_model),
                                               split.votes)}
        if split.votes is not None:
            models[name]["ferplus"] = ferplus_metrics(split.votes, probs_by_model[name])
        log.info("%s: accuracy %.4f, blessed=%s (%s)", name, metrics["accuracy"], blessed,
                 "; ".join(reasons))

    ensemble = ensemble_metrics(labels, probs_by_model, config.tie_tolerance, split.rows)
    if split.votes is not None:
        ensemble["ferplus"] = ensemble_ferplus(split.votes, probs_by_model, config.tie_tolerance)
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


def with_votes(mistakes: dict[str, list[dict[str, Any]]], votes: Optional[np.ndarray]
               ) -> dict[str, list[dict[str, Any]]]:
    """The gallery's faces with their FER+ votes (what the crowd saw), when there are any."""
    if votes is not None:
        for faces in mistakes.values():
            for face in faces:
                face["votes"] = votes_by_class(votes[face["index"]])
    return mistakes


def ensemble_ferplus(votes: np.ndarray, probs_by_model: Mapping[str, np.ndarray],
                     tolerance: float) -> dict[str, Any]:
    """The ensemble's decisions against FER+'s majority (cross-entropy: not defined for a
    rule that picks one model's answer per face)."""
    class_ids, _, _ = combine_batch(probs_by_model, tolerance)
    width = next(iter(probs_by_model.values())).shape[1]
    majority = votes[:, :width].argmax(axis=1)
    return {"examples": int(len(votes)),
            "accuracy_majority": float((class_ids == majority).mean())}


def write_test_predictions(path: str, probs_by_model: Mapping[str, np.ndarray]) -> None:
    """Every model's test-split probabilities, [n, 7] float32 per model in file order:
    what `fer-pipeline monitor` compares the served answers (class mix, confidence, review
    rate) with, so it never re-runs a model to know what the evaluation saw."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: np.asarray(probs, np.float32)
                                   for name, probs in probs_by_model.items()})
    fileio.write_bytes(path, buffer.getvalue())


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
                     labels: np.ndarray) -> Optional[dict[str, Any]]:
    """Accuracy and loss of the version now in serving, on the same examples; None if none."""
    latest = latest_served_version(serving_root, name) if serving_root else None
    if latest is None:
        return None
    version, path = latest
    metrics = classification_metrics(labels, predict_probabilities(path, serialized))
    return {"version": version, "path": path, "accuracy": metrics["accuracy"],
            "loss": metrics["loss"]}
