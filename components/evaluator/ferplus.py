"""Evaluation against FER+ votes beyond core/ferplus_votes.py's per-model metrics: the
gallery's faces with their votes, the ensemble's decisions against the FER+ majority, and
what the gate compares when it judges against FER+'s majority (evaluation.gate_labels)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fer_pipeline.components.evaluator.metrics import classification_metrics, majority_baseline
from fer_pipeline.core.calibration import model_calibration
from fer_pipeline.core.ferplus_votes import vote_majority, votes_by_class

__all__ = ["with_votes", "ensemble_ferplus", "ferplus_gate_metrics"]


def with_votes(mistakes: dict[str, list[dict[str, Any]]], votes: Optional[np.ndarray]
               ) -> dict[str, list[dict[str, Any]]]:
    """The gallery's faces with their FER+ votes (what the crowd saw), when there are any."""
    if votes is not None:
        for faces in mistakes.values():
            for face in faces:
                face["votes"] = votes_by_class(votes[face["index"]])
    return mistakes


def ensemble_ferplus(votes: np.ndarray, class_ids: np.ndarray, width: int) -> dict[str, Any]:
    """The ensemble's decisions (`class_ids`, of a `width`-class ensemble) against FER+'s
    majority (cross-entropy: not defined for a rule that picks one model's answer per face)."""
    majority = vote_majority(votes, width)
    return {"examples": int(len(votes)),
            "accuracy_majority": float((class_ids == majority).mean())}


def ferplus_gate_metrics(votes: np.ndarray, probs: np.ndarray, logits: np.ndarray,
                         temperature: Optional[float]) -> dict[str, Any]:
    """One model's accuracy, per-class recall, calibration and majority-class baseline
    against FER+'s majority over the model's classes (8 with contempt), for the gate."""
    width = probs.shape[1]
    majority = vote_majority(votes, width)
    metrics = classification_metrics(majority, probs)
    metrics["calibration"] = model_calibration(majority, logits, probs, temperature)
    metrics["majority_baseline"] = majority_baseline(majority, width)
    return metrics
