"""The models' answers: class and confidence per model, and the ensemble's review flags.

The same form serves the window's traffic (served_answers) and the test split the served
versions were evaluated on (answers_from_probabilities), so both are turned into TFDV
statistics the same way.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.components.monitor.features import statistics
from fer_pipeline.components.monitor.reading import Traffic
from fer_pipeline.core.contract import CLASS_NAMES, NUM_CLASSES
from fer_pipeline.core.ensemble import combine_batch

__all__ = ["REVIEW_FEATURE", "Answers", "answers_from_probabilities", "answer_columns",
           "merged_statistics", "served_answers", "summary_numbers"]

REVIEW_FEATURE = "review"


@dataclass
class Answers:
    """Per model its answers (class id, confidence), and the ensemble's review flags."""
    class_ids: dict[str, np.ndarray]
    confidences: dict[str, np.ndarray]
    review: Optional[np.ndarray]       # bool [faces answered by every model]; None: 1 model


def answers_from_probabilities(probs_by_model: Mapping[str, np.ndarray],
                               tolerance: float) -> Answers:
    """Each model's answers to the same faces, and the ensemble's tie rule over them."""
    review = (combine_batch(probs_by_model, tolerance)[2] if len(probs_by_model) > 1
              and len(next(iter(probs_by_model.values()))) else None)
    return Answers({m: p.argmax(axis=1) for m, p in probs_by_model.items()},
                   {m: p.max(axis=1).astype(np.float64) for m, p in probs_by_model.items()},
                   review)


def answer_columns(answers: Answers) -> dict[str, dict[str, np.ndarray]]:
    """Separate column groups (their lengths differ): one per model, one for review."""
    groups = {model: {f"class_{model}": np.array(CLASS_NAMES, dtype=object)[ids].astype(bytes),
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


def _pair_by_face(traffic: Traffic, rows: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per model the probabilities of the faces every model answered, and those faces'
    traffic rows (first model's), matched by pixel content: the client sends the same face
    to each model."""
    by_hash: list[dict[bytes, int]] = []
    for model, index in rows.items():
        lookup: dict[bytes, int] = {}
        for row in index:
            lookup[hashlib.sha1(traffic.pixels[row].tobytes()).digest()] = int(row)
        by_hash.append(lookup)
    common = [key for key in by_hash[0] if all(key in other for other in by_hash[1:])]
    paired = {model: traffic.probabilities[[lookup[k] for k in common]]
              for model, lookup in zip(rows, by_hash)}
    return paired, np.array([by_hash[0][k] for k in common], np.int64)


def served_answers(traffic: Traffic, primary: Mapping[str, int], tolerance: float
                   ) -> tuple[Answers, dict[str, np.ndarray], np.ndarray]:
    """Answers of each model's primary version; the ensemble over faces every model
    answered (paired by pixel content: the client sends the same face to each model).

    Returns the answers, per model the traffic rows used, and the traffic rows of the
    faces the ensemble judged (first model's rows), in the order of `answers.review`.
    """
    rows = {model: np.flatnonzero((traffic.models == model) & (traffic.versions == version))
            for model, version in primary.items()}
    probs = {model: traffic.probabilities[index] for model, index in rows.items()}
    class_ids = {m: p.argmax(axis=1) for m, p in probs.items()}
    confidences = {m: p.max(axis=1).astype(np.float64) for m, p in probs.items()}
    review, paired_rows = None, np.zeros(0, np.int64)
    if len(rows) > 1:
        paired, paired_rows = _pair_by_face(traffic, rows)
        review = (combine_batch(paired, tolerance)[2] if len(paired_rows)
                  else np.zeros(0, bool))
    return Answers(class_ids, confidences, review), rows, paired_rows


def _class_mix(class_ids: np.ndarray) -> dict[str, float]:
    counts = np.bincount(class_ids, minlength=NUM_CLASSES)
    total = max(int(counts.sum()), 1)
    return {CLASS_NAMES[k]: float(counts[k] / total) for k in range(NUM_CLASSES)}


def summary_numbers(answers: Answers) -> dict[str, Any]:
    """What a person reads of the answers: class mix, mean confidence, review rate."""
    return {
        "class_mix": {m: _class_mix(ids) for m, ids in answers.class_ids.items()},
        "mean_confidence": {m: (float(c.mean()) if len(c) else None)
                            for m, c in answers.confidences.items()},
        "review_rate": (float(answers.review.mean()) if answers.review is not None
                        and len(answers.review) else None),
    }
