"""The models' answers: class and confidence per model, and the ensemble's review flags.

The test split the served versions were evaluated on is held in memory
(answers_from_probabilities) and turned into TFDV statistics with the same feature names
the served window's get in the Beam job (job.py); the window's class mix, mean confidence
and review rate come from the job's sums (summary_from_counts), the test split's from its
arrays (summary_numbers), in the same form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.components.monitor.features import statistics
from fer_pipeline.core.contract import NUM_CLASSES, class_names_for
from fer_pipeline.core.ensemble import combine_batch

__all__ = ["REVIEW_FEATURE", "Answers", "answers_from_probabilities", "answer_columns",
           "merged_statistics", "summary_numbers", "summary_from_counts"]

REVIEW_FEATURE = "review"


@dataclass
class Answers:
    """Per model its answers (class id, confidence), and the ensemble's review flags."""
    class_ids: dict[str, np.ndarray]
    confidences: dict[str, np.ndarray]
    review: Optional[np.ndarray]       # bool [faces answered by every model]; None: 1 model
    # Per model its class count: FER-2013's 7 (the default), or FER+'s 8 with contempt.
    num_classes: dict[str, int] = field(default_factory=dict)


def answers_from_probabilities(probs_by_model: Mapping[str, np.ndarray],
                               tolerance: float) -> Answers:
    """Each model's answers to the same faces, and the ensemble's tie rule over them."""
    review = (combine_batch(probs_by_model, tolerance)[2] if len(probs_by_model) > 1
              and len(next(iter(probs_by_model.values()))) else None)
    return Answers({m: p.argmax(axis=1) for m, p in probs_by_model.items()},
                   {m: p.max(axis=1).astype(np.float64) for m, p in probs_by_model.items()},
                   review, {m: int(p.shape[1]) for m, p in probs_by_model.items()})


def answer_columns(answers: Answers) -> dict[str, dict[str, np.ndarray]]:
    """Separate column groups (their lengths differ): one per model, one for review."""
    groups = {model: {f"class_{model}": np.array(
                          class_names_for(answers.num_classes.get(model, NUM_CLASSES)),
                          dtype=object)[ids].astype(bytes),
                      f"confidence_{model}": answers.confidences[model]}
              for model, ids in answers.class_ids.items()}
    if answers.review is not None:
        groups[REVIEW_FEATURE] = {REVIEW_FEATURE: np.where(answers.review, b"review",
                                                           b"decided")}
    return groups


def merged_statistics(groups: Mapping[str, Mapping[str, np.ndarray]]
                      ) -> statistics_pb2.DatasetFeatureStatisticsList:
    """One statistics list holding every group's features (TFDV compares per feature)."""
    merged = statistics_pb2.DatasetFeatureStatisticsList()
    dataset = merged.datasets.add()
    for columns in groups.values():
        if not len(next(iter(columns.values()))):
            continue
        part = statistics(columns).datasets[0]
        dataset.num_examples = max(dataset.num_examples, part.num_examples)
        for feature in part.features:
            dataset.features.add().CopyFrom(feature)
    return merged


def _class_mix(class_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[str, float]:
    counts = np.bincount(class_ids, minlength=num_classes)
    total = max(int(counts.sum()), 1)
    return {name: float(counts[k] / total) for k, name in enumerate(class_names_for(num_classes))}


def summary_numbers(answers: Answers) -> dict[str, Any]:
    """What a person reads of the answers: class mix, mean confidence, review rate."""
    return {
        "class_mix": {m: _class_mix(ids, answers.num_classes.get(m, NUM_CLASSES))
                      for m, ids in answers.class_ids.items()},
        "mean_confidence": {m: (float(c.mean()) if len(c) else None)
                            for m, c in answers.confidences.items()},
        "review_rate": (float(answers.review.mean()) if answers.review is not None
                        and len(answers.review) else None),
    }


def summary_from_counts(counts: Mapping[tuple, int], label: str, primary: Mapping[str, int],
                        combo: Optional[str], unit: float) -> dict[str, Any]:
    """The same numbers as summary_numbers, from the job's sums for window `label`: each
    model's primary version's answers, and the review rate of the faces every served
    model answered (`combo`: their versions). Confidences were summed in `unit`s."""
    mix, confidence = {}, {}
    for model, version in primary.items():
        answered = counts.get(("answers", label, model, version), 0)
        # Each answer added its class count (7, or FER+'s 8) to "width".
        width = counts.get(("width", label, model, version), 0) // answered if answered \
            else NUM_CLASSES
        names = class_names_for(width or NUM_CLASSES)
        mix[model] = {name: counts.get(("class", label, model, version, k), 0) / max(answered, 1)
                      for k, name in enumerate(names)}
        confidence[model] = (counts.get(("confidence", label, model, version), 0) * unit
                             / answered if answered else None)
    paired = counts.get(("paired", label, combo), 0) if combo else 0
    return {"class_mix": mix, "mean_confidence": confidence,
            "review_rate": counts.get(("ties", label, combo), 0) / paired if paired else None}
