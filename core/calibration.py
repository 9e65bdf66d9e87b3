"""Calibrated confidences: temperature scaling, expected calibration error, reliability bins.

A model's probability 0.8 should mean "right 80 % of the time". Deep classifiers are
over-confident, and our two models differently so, while the ensemble rule compares their
confidences and the monitor watches them. Temperature scaling (Guo et al. 2017, "On
Calibration of Modern Neural Networks") fixes that with one number per model: the served
probabilities are softmax(logits / T), with T > 0 fitted after training on the validation
split by minimising the negative log-likelihood. Dividing every logit by the same T never
changes which class is on top, so accuracy and the confusion matrix stay what they were.

Expected calibration error (ECE): the top-class confidences fall into ECE_BINS equal-width
bins over [0, 1] (bin b holds (b/B, (b+1)/B], the first also 0); ECE is the sum over bins of
(faces in the bin / all faces) x |accuracy in the bin - mean confidence in the bin|.

Pure numpy: the trainer, the model importer and the evaluator call it, nothing else.
Every array is [n, classes] with the class count taken from its width.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from fer_pipeline.core.ensemble import combine_batch

__all__ = ["ECE_BINS", "calibration_record", "ensemble_calibration",
           "expected_calibration_error", "fit_temperature", "fitted_temperature",
           "logits_from_probabilities",
           "model_calibration", "negative_log_likelihood", "reliability_bins", "softmax"]

ECE_BINS = 15
# The search range of T. Far beyond what any trained classifier needs (our models land
# between 0.8 and 3), and bounded so a degenerate split (every face right with huge logits)
# cannot drive T to 0 or infinity.
T_MIN, T_MAX = 0.02, 50.0
_SEARCH_STEPS = 80      # golden-section steps on log T: the bracket shrinks by 0.618^80
_TINY = 1e-12           # the floor under a probability before its log


def _log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), row-wise, in float64."""
    return np.exp(_log_softmax(logits, temperature))


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p: equal to the logits up to a constant per row, which softmax ignores (what a
    model that only answers probabilities is calibrated from)."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), _TINY, 1.0))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label]."""
    labels = np.asarray(labels, np.int64)
    log_p = _log_softmax(logits, temperature)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimising the validation NLL of softmax(logits / T).

    The NLL is convex in 1/T (a log-sum-exp of functions linear in it minus a linear
    term), so it has one minimum along log T too and a golden-section search finds it
    without gradients or a dependency. 1.0 when there is nothing to fit on.
    """
    if len(labels) == 0:
        return 1.0
    low, high = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, float(np.exp(log_t)))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2.0))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray,
                     bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its edges, how many faces, their mean top-class
    confidence and their accuracy (None for an empty bin)."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    # (b/B, (b+1)/B]: a confidence exactly on an edge belongs to the lower bin.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    found = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        found.append({"lower": b / bins, "upper": (b + 1) / bins, "count": n,
                      "confidence": float(confidence[members].mean()) if n else None,
                      "accuracy": float(correct[members].mean()) if n else None})
    return found


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins of the top-class confidence (module docstring)."""
    total = len(labels)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probabilities, labels, bins) if b["count"]))


def _scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    labels = np.asarray(labels, np.int64)
    picked = np.clip(np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels],
                     _TINY, 1.0)
    return {"nll": float(-np.log(picked).mean()) if len(labels) else 0.0,
            "ece": expected_calibration_error(probabilities, labels),
            "bins": reliability_bins(probabilities, labels)}


def calibration_record(logits: Optional[np.ndarray], labels: np.ndarray,
                       temperature: Optional[float] = None, split: str = "validation",
                       logits_kind: str = "logits") -> dict[str, Any]:
    """What a trained model keeps (training_info.json's "calibration"): T fitted on these
    logits (or the given one), and the NLL and ECE on them before (T = 1) and after.

    `logits` None or empty: nothing to fit on; T = 1 and `calibrated` False.
    `logits_kind`: "logits" (the pre-softmax values) or "log_probabilities".
    """
    if logits is None or len(labels) == 0:
        return {"calibrated": False, "temperature": 1.0, "split": split,
                "reason": f"no {split} data to fit a temperature on: not calibrated"}
    fitted = fit_temperature(logits, labels) if temperature is None else float(temperature)
    before = {k: v for k, v in _scores(softmax(logits), labels).items() if k != "bins"}
    after = {k: v for k, v in _scores(softmax(logits, fitted), labels).items() if k != "bins"}
    # T at the top of its range: the model does no better than answering near-uniformly
    # on these faces (an untrained or broken model), which is what the fit makes it do.
    at_bound = not T_MIN * 1.01 < fitted < T_MAX / 1.01
    return {"calibrated": True, "temperature": fitted, "split": split, "at_bound": at_bound,
            "examples": int(len(labels)), "logits": logits_kind,
            "method": "temperature scaling (NLL, golden-section search on log T)",
            "before": before, "after": after}


def fitted_temperature(training_info: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The T a model was exported with (its training_info.json); None when none was fitted
    (an imported file without validation data, a model trained before calibration)."""
    fitted = (training_info or {}).get("calibration") or {}
    return float(fitted["temperature"]) if fitted.get("calibrated") else None


def model_calibration(labels: np.ndarray, logits: np.ndarray, probabilities: np.ndarray,
                      temperature: Optional[float] = None) -> dict[str, Any]:
    """The evaluation's numbers for one model: NLL, ECE and reliability bins of the raw
    softmax(logits) ("before", T = 1) and of the served, calibrated probabilities ("after"),
    with the `temperature` the model was exported with (None: not fitted)."""
    return {"bins_count": ECE_BINS, "temperature": temperature,
            "before": _scores(softmax(logits), labels),
            "after": _scores(probabilities, labels)}


def ensemble_calibration(labels: np.ndarray, logits_by_model: Mapping[str, np.ndarray],
                         probs_by_model: Mapping[str, np.ndarray],
                         tolerance: float) -> dict[str, Any]:
    """The ensemble rule (core/ensemble.py) applied to the uncalibrated and to the
    calibrated probabilities: its accuracy, review rate, and the ECE and NLL of the
    winning model's confidence (the confidence a caller is given)."""
    found: dict[str, Any] = {"bins_count": ECE_BINS}
    for when, probs in (("before", {n: softmax(v) for n, v in logits_by_model.items()}),
                        ("after", dict(probs_by_model))):
        class_ids, confidences, review = combine_batch(probs, tolerance)
        correct = class_ids == np.asarray(labels)
        # The winner's full probability row, for the NLL of the true class.
        stacked = np.stack([np.asarray(p, np.float64) for p in probs.values()])
        winner = stacked.max(axis=2).argmax(axis=0)
        rows = stacked[winner, np.arange(stacked.shape[1])]
        scores = _scores(rows, labels)
        found[when] = {"accuracy": float(correct.mean()) if len(correct) else 0.0,
                       "human_review_rate": float(review.mean()) if len(review) else 0.0,
                       "mean_confidence": float(confidences.mean()) if len(review) else 0.0,
                       **scores}
    return found
