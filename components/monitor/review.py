"""The faces a person should look at: the window's ties and its least confident answers.

They are shown on the page (least_confident_faces) and, with a review queue, queued for a
person (serving/review_queue.py) with every model's answer and the ensemble's decision.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from fer_pipeline.components.monitor.answers import Answers
from fer_pipeline.components.monitor.reading import Traffic, iso_time
from fer_pipeline.core.contract import CLASS_NAMES
from fer_pipeline.core.ensemble import combine
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue

__all__ = ["REVIEW_SOURCE", "least_confident_faces", "queue_for_review"]

REVIEW_SOURCE = "request log"


def _lowest_confidence_rows(traffic: Traffic, rows: Mapping[str, np.ndarray],
                            limit: int) -> list[int]:
    """Traffic rows of the `limit` distinct faces some model answered least confidently."""
    every = np.concatenate(list(rows.values())) if rows else np.zeros(0, np.int64)
    confidence = traffic.probabilities[every].max(axis=1) if len(every) else np.zeros(0)
    chosen: dict[bytes, int] = {}
    for row in every[np.argsort(confidence, kind="stable")]:
        if len(chosen) >= limit:
            break
        chosen.setdefault(traffic.pixels[row].tobytes(), int(row))
    return list(chosen.values())


def _answers_by_face(traffic: Traffic, rows: Mapping[str, np.ndarray],
                     wanted: set[bytes]) -> dict[bytes, dict[str, int]]:
    """For each wanted face (pixel bytes): model -> its traffic row."""
    found: dict[bytes, dict[str, int]] = {}
    for model, index in rows.items():
        for row in index:
            key = traffic.pixels[row].tobytes()
            if key in wanted:
                found.setdefault(key, {})[model] = int(row)
    return found


def least_confident_faces(traffic: Traffic, rows: Mapping[str, np.ndarray],
                          limit: int) -> list[dict[str, Any]]:
    """The page's gallery: pixels and every model's answer of the least confident faces."""
    chosen = _lowest_confidence_rows(traffic, rows, limit)
    answers = _answers_by_face(traffic, rows, {traffic.pixels[r].tobytes() for r in chosen})
    faces = []
    for row in chosen:
        per_model = answers[traffic.pixels[row].tobytes()]
        faces.append({"pixels": traffic.pixels[row], "row": row, "answers": {
            m: {"class_name": CLASS_NAMES[int(traffic.probabilities[r].argmax())],
                "confidence": float(traffic.probabilities[r].max())}
            for m, r in per_model.items()}})
    return faces


def _faces_to_queue(traffic: Traffic, answers: Answers, rows: Mapping[str, np.ndarray],
                    paired_rows: np.ndarray, lowest: int) -> dict[bytes, tuple[str, int]]:
    """Face (pixel bytes) -> (why it is queued, its traffic row); a tie wins over low
    confidence when a face is both."""
    chosen: dict[bytes, tuple[str, int]] = {}
    if answers.review is not None:
        for row in paired_rows[answers.review]:
            chosen.setdefault(traffic.pixels[row].tobytes(), ("tied", int(row)))
    for row in _lowest_confidence_rows(traffic, rows, lowest):
        chosen.setdefault(traffic.pixels[row].tobytes(), ("low confidence", row))
    return chosen


def queue_for_review(queue_dir: str, traffic: Traffic, answers: Answers,
                     rows: Mapping[str, np.ndarray], paired_rows: np.ndarray,
                     tolerance: float, lowest: int) -> dict[str, int]:
    """Queues the window's tied faces and its `lowest` lowest-confidence ones."""
    chosen = _faces_to_queue(traffic, answers, rows, paired_rows, lowest)
    found = _answers_by_face(traffic, rows, set(chosen))
    by_face = {key: {m: ModelPrediction(int(traffic.versions[r]), traffic.probabilities[r])
                     for m, r in per_model.items()} for key, per_model in found.items()}
    queued = already = 0
    with ReviewQueue(queue_dir) as queue:
        for key, (why, row) in chosen.items():
            predictions = by_face[key]
            decision = dataclasses.asdict(combine(
                {m: p.probabilities for m, p in predictions.items()}, tolerance))
            decision["monitor_reason"] = why
            stamp = int(traffic.timestamps[row])
            result = queue.record(traffic.pixels[row],
                                  f"{REVIEW_SOURCE} {iso_time(stamp) or ''}".strip(),
                                  predictions, decision)
            queued += int(result.inserted)
            already += int(not result.inserted)
    return {"queued": queued, "already_queued": already}
