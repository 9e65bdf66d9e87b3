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

Every model must answer the same classes: FER-2013's seven, or FER+'s eight (with
`contempt`), told apart by the width of the probabilities (core/contract.class_names_for).
Combining a 7- and an 8-class model would compare class 7 of one with nothing of the other,
so it is refused (ClassSetMismatch) instead of answering something wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from fer_pipeline.core.contract import (CLASS_NAMES, CLASS_NAMES_ES, CLASS_NAMES_FERPLUS,
                                        CLASS_NAMES_FERPLUS_ES, class_names_for)
from fer_pipeline.core.errors import InputDataError

__all__ = ["ClassSetMismatch", "EnsembleDecision", "class_names_es_for", "combine",
           "combine_batch", "shared_class_count"]

# Confidences are float32 probabilities; 0.55 - 0.50 is 0.05000000000000004 in floats, and a
# user who sets tolerance=0.05 means that gap to count as "within". This slack absorbs that.
_FLOAT_SLACK = 1e-6


class ClassSetMismatch(InputDataError):
    """The models answer different class sets (a FER-2013 and a FER+ model): no rule can
    combine them. A ValueError and a UserError: callers print its one line."""


def class_names_es_for(num_classes: int) -> tuple[str, ...]:
    """The Spanish names beside core/contract.class_names_for's English ones."""
    return CLASS_NAMES_FERPLUS_ES if class_names_for(num_classes) == CLASS_NAMES_FERPLUS \
        else CLASS_NAMES_ES


def shared_class_count(widths: Mapping[str, int]) -> int:
    """The one class count of every model (model name -> width of its probabilities);
    ClassSetMismatch when they differ, ValueError when a width is no FER model's."""
    for model, width in widths.items():
        try:
            class_names_for(width)
        except ValueError:
            raise ValueError(f"model {model!r}: expected {len(CLASS_NAMES)} or "
                             f"{len(CLASS_NAMES_FERPLUS)} probabilities, got {width}") from None
    counts = sorted(set(widths.values()))
    if len(counts) > 1:
        named = ", ".join(f"{model} has {width}" for model, width in widths.items())
        raise ClassSetMismatch(
            f"the models answer different class sets ({named} classes: "
            f"{len(CLASS_NAMES)} = FER-2013's, {len(CLASS_NAMES_FERPLUS)} = FER+ with contempt); "
            "an ensemble needs models trained on the same classes (ingest.ferplus_classes)")
    return counts[0]


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


def _top_vote(probs: np.ndarray) -> tuple[int, float]:
    """A model's top class and its probability."""
    class_id = int(np.argmax(probs))
    return class_id, float(probs[class_id])


def combine(probabilities: Mapping[str, Sequence[float]], tolerance: float) -> EnsembleDecision:
    """Combines one image's class probabilities from each model into one decision.

    `probabilities` maps model name to its 7 (or, FER+, 8) class probabilities; every
    model must have the same number (shared_class_count). Ties in confidence go to the
    model listed first (dict order), which keeps the answer deterministic.
    """
    if not probabilities:
        raise ValueError("combine() needs at least one model's probabilities")
    vectors = {name: np.asarray(probs, dtype=np.float64).reshape(-1)
               for name, probs in probabilities.items()}
    num_classes = shared_class_count({name: v.shape[0] for name, v in vectors.items()})
    names, names_es = class_names_for(num_classes), class_names_es_for(num_classes)
    votes = {name: _top_vote(probs) for name, probs in vectors.items()}
    per_model = {name: {"class_id": cid, "confidence": conf} for name, (cid, conf) in votes.items()}

    # max() keeps the first of equal keys, so the first-listed model wins exact ties.
    winner = max(votes, key=lambda name: votes[name][1])
    class_id, confidence = votes[winner]
    dissent = {name: conf for name, (cid, conf) in votes.items() if cid != class_id}

    if not dissent:
        needs_review = False
        reason = (f"all {len(votes)} models agree on {names[class_id]}"
                  if len(votes) > 1 else f"single model {winner}")
    else:
        rival = max(dissent, key=dissent.get)
        gap = confidence - dissent[rival]
        needs_review = gap <= tolerance + _FLOAT_SLACK
        rival_class = names[votes[rival][0]]
        if needs_review:
            reason = (f"models disagree ({winner}: {names[class_id]} {confidence:.3f}, "
                      f"{rival}: {rival_class} {dissent[rival]:.3f}); gap {gap:.3f} <= "
                      f"tolerance {tolerance:.3f}: human review")
        else:
            reason = (f"models disagree; {winner} is more confident ({confidence:.3f} vs "
                      f"{rival} {dissent[rival]:.3f}, gap {gap:.3f} > tolerance {tolerance:.3f})")

    return EnsembleDecision(
        class_id=class_id,
        class_name=names[class_id],
        class_name_es=names_es[class_id],
        confidence=confidence,
        winner=winner,
        needs_human_review=needs_review,
        reason=reason,
        per_model=per_model,
    )


def combine_batch(probs_by_model: Mapping[str, np.ndarray],
                  tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same rule as `combine`, vectorized over a batch.

    `probs_by_model` maps model name to a `[n, 7]` (or `[n, 8]`) probability array, the
    same shape for all (a 7- and an 8-class model: ClassSetMismatch).
    Returns `(class_ids int64 [n], confidences float64 [n], needs_review bool [n])`.
    """
    if not probs_by_model:
        raise ValueError("combine_batch() needs at least one model's probabilities")
    arrays = {name: np.asarray(p, dtype=np.float64) for name, p in probs_by_model.items()}
    if any(a.ndim != 2 for a in arrays.values()):
        raise ValueError("expected [n, classes] arrays, got shapes "
                         f"{[a.shape for a in arrays.values()]}")
    shared_class_count({name: a.shape[1] for name, a in arrays.items()})
    if len({a.shape[0] for a in arrays.values()}) > 1:
        raise ValueError("expected arrays of equal n, got shapes "
                         f"{[a.shape for a in arrays.values()]}")
    stacked = np.stack(list(arrays.values()))
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
