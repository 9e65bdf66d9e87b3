"""The ensemble as the product runs it on the test split, and the faces the report shows:
each model's most confident mistakes and the ensemble's reviewed faces and closest calls,
every model's answer alongside."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.components.evaluator.ferplus import ensemble_ferplus
from fer_pipeline.components.evaluator.metrics import confusion_matrix
from fer_pipeline.components.evaluator.split import TestSplit
from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_FERPLUS, NUM_CLASSES
from fer_pipeline.core.ensemble import combine_batch

__all__ = ["MISTAKES_PER_CLASS", "REVIEW_FACES", "CLOSEST_CALLS", "confident_mistakes",
           "confidence_gaps", "ensemble_metrics"]

# How many faces the report shows: the most confident mistakes per true class and model,
# and the faces the ensemble sent to human review. Bounded so the page stays small.
MISTAKES_PER_CLASS = 5
REVIEW_FACES = 24
# Disagreements the ensemble decided alone, smallest confidence gap first: what a person
# looks at to judge tie_tolerance (and all the report can show when nothing went to review).
CLOSEST_CALLS = 12


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
                     closest_calls: int = CLOSEST_CALLS,
                     ferplus_votes: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The ensemble as the product will run it: accuracy, agreement, review rate, accuracy
    when automatic, the first `review_faces` faces it sends to a person and the
    `closest_calls` disagreements it decided alone with the smallest confidence gaps; with
    the test split's `ferplus_votes`, its accuracy against their majority under "ferplus"."""
    class_ids, _, review = combine_batch(probs_by_model, tolerance)
    correct = class_ids == labels
    automatic = ~review
    votes = np.stack([p.argmax(axis=1) for p in probs_by_model.values()])
    agree = (votes == votes[0]).all(axis=0)
    reviewed = np.flatnonzero(review)
    gaps = confidence_gaps(probs_by_model, class_ids)
    decided = np.flatnonzero(automatic & np.isfinite(gaps))
    closest = decided[np.argsort(gaps[decided], kind="stable")][:closest_calls]
    width = next(iter(probs_by_model.values())).shape[1]
    metrics = {
        "models": list(probs_by_model),
        "tie_tolerance": tolerance,
        "accuracy": float(correct.mean()),
        "agreement_rate": float(agree.mean()),
        "human_review_rate": float(review.mean()),
        "reviewed": int(review.sum()),
        "accuracy_non_reviewed": float(correct[automatic].mean()) if automatic.any() else None,
        "confusion_matrix": confusion_matrix(labels, class_ids, width).tolist(),
        "review_examples": [_ensemble_face(i, labels, rows, class_ids, gaps, probs_by_model)
                            for i in reviewed[:review_faces]],
        "closest_calls": [_ensemble_face(i, labels, rows, class_ids, gaps, probs_by_model)
                          for i in closest],
    }
    if ferplus_votes is not None:
        metrics["ferplus"] = ensemble_ferplus(ferplus_votes, class_ids, width)
    return metrics
