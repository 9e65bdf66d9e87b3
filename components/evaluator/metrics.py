"""Classification metrics of one model's probabilities against a set of labels: FER-2013's,
or FER+'s majority when the gate judges against it (ferplus.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from fer_pipeline.core.contract import CLASS_NAMES_FERPLUS, CLASS_NAMES_FERPLUS_ES, NUM_CLASSES

__all__ = ["confusion_matrix", "classification_metrics", "majority_baseline"]

# Keras clips probabilities the same way before the log in categorical cross-entropy, so our
# loss matches the number training reported for a model that outputs an exact 0.
_LOSS_EPSILON = 1e-7


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


def majority_baseline(labels: np.ndarray, width: int = NUM_CLASSES) -> dict[str, Any]:
    """Accuracy of answering the test split's most frequent class for every face (`width`
    8: FER+'s majority labels, which may name contempt)."""
    counts = np.bincount(labels, minlength=width)
    majority = int(counts.argmax())
    return {"class_id": majority, "class_name": CLASS_NAMES_FERPLUS[majority],
            "accuracy": float(counts[majority] / counts.sum())}
