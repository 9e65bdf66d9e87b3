"""The product's decision rule for combining several models' predictions, in one place.

Both the evaluator (to score the ensemble on the test split) and the serving client (to
answer a user) call this module, so the rule that was measured is the rule that ships.

The rule, per image:
1. Each model votes for its top class, with that class's probability as its confidence.
2. If every model votes for the same class, that class wins, with the highest confidence.
3. Otherwise the most confident model wins, unless the most confident vote for a
   *different* class is within `tolerance` of it: then the models disagree and neither is
   clearly surer, so the image is flagged for human review. The most confident model's
   class is still reported, so a caller that cannot ask a human still gets an answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES, NUM_CLASSES

# Confidences are float32 probabilities; 0.55 - 0.50 is 0.05000000000000004 in floats, and a
# user who sets tolerance=0.05 means that gap to count as "within". This slack absorbs that.
_FLOAT_SLACK = 1e-6


@dataclass
class EnsembleDecision:
    class_id: int
    class_name: str
    class_name_es: str
    confidence: float
    winner: Optional[str]          # the most confident model; None when the ensemble is empty
    needs_human_review: bool
    reason: str
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)


def _top_vote(probabilities: Sequence[float], model: str) -> tuple[int, float]:
    """A model's top class and its probability; rejects vectors of the wrong length."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.shape[0] != NUM_CLASSES:
        raise ValueError(f"model {model!r}: expected {NUM_CLASSES} probabilities, "
                         f"got {probs.shape[0]}")
    class_id = int(np.argmax(probs))
    return class_id, float(probs[class_id])


def combine(probabilities: Mapping[str, Sequence[float]], tolerance: float) -> EnsembleDecision:
    """Combines one image's class probabilities from each model into one decision.

    `probabilities` maps model name to its 7 class probabilities. Ties in confidence go
    to the model listed first (dict order), which keeps the answer deterministic.
    """
    if not probabilities:
        raise ValueError("combine() needs at least one model's probabilities")
    votes = {name: _top_vote(probs, name) for name, probs in probabilities.items()}
    per_model = {name: {"class_id": cid, "confidence": conf} for name, (cid, conf) in votes.items()}

    # max() keeps the first of equal keys, so the first-listed model wins exact ties.
    winner = max(votes, key=lambda name: votes[name][1])
    class_id, confidence = votes[winner]
    dissent = {name: conf for name, (cid, conf) in votes.items() if cid != class_id}

    if not dissent:
        needs_review = False
        reason = (f"all {len(votes)} models agree on {CLASS_NAMES[class_id]}"
                  if len(votes) > 1 else f"single model {winner}")
    else:
        rival = max(dissent, key=dissent.get)
        gap = confidence - dissent[rival]
        needs_review = gap <= tolerance + _FLOAT_SLACK
        rival_class = CLASS_NAMES[votes[rival][0]]
        if needs_review:
            reason = (f"models disagree ({winner}: {CLASS_NAMES[class_id]} {confidence:.3f}, "
                      f"{rival}: {rival_class} {dissent[rival]:.3f}); gap {gap:.3f} <= "
                      f"tolerance {tolerance:.3f}: human review")
        else:
            reason = (f"models disagree; {winner} is more confident ({confidence:.3f} vs "
                      f"{rival} {dissent[rival]:.3f}, gap {gap:.3f} > tolerance {tolerance:.3f})")

    return EnsembleDecision(
        class_id=class_id,
        class_name=CLASS_NAMES[class_id],
        class_name_es=CLASS_NAMES_ES[class_id],
        confidence=confidence,
        winner=winner,
        needs_human_review=needs_review,
        reason=reason,
        per_model=per_model,
    )


def combine_batch(probs_by_model: Mapping[str, np.ndarray],
                  tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same rule as `combine`, vectorized over a batch.

    `probs_by_model` maps model name to a `[n, 7]` probability array (same n for all).
    Returns `(class_ids int64 [n], confidences float64 [n], needs_review bool [n])`.
    """
    if not probs_by_model:
        raise ValueError("combine_batch() needs at least one model's probabilities")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs_by_model.values()])
    if stacked.ndim != 3 or stacked.shape[2] != NUM_CLASSES:
        raise ValueError(f"expected [n, {NUM_CLASSES}] arrays of equal n, got shape "
                         f"{stacked.shape[1:]} across {stacked.shape[0]} models")
    votes = stacked.argmax(axis=2)                       # [models, n]
    confs = stacked.max(axis=2)                          # [models, n]
    winner = confs.argmax(axis=0)                        # first model wins exact ties
    columns = np.arange(stacked.shape[1])
    class_ids = votes[winner, columns]
    confidences = confs[winner, columns]

    disagrees = votes != class_ids[None, :]
    rival_conf = np.where(disagrees, confs, -np.inf).max(axis=0)
    needs_review = disagrees.any(axis=0) & (confidences - rival_conf <= tolerance + _FLOAT_SLACK)
    return class_ids.astype(np.int64), confidences, needs_review
