"""The faces a person should look at: the window's ties and its least confident answers.

The Beam job brings back bounded samples of them (job.py: the least confident faces, and
at most MAX_TIES tied ones, least confident first); they are shown on the page
(least_confident_faces) and, with a review queue, queued for a person
(serving/review_queue.py) with every model's answer and the ensemble's decision. Only the
answers of the served versions count: a face answered by another version (a push
mid-window) is left out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from fer_pipeline.components.monitor.join import Face
from fer_pipeline.components.monitor.reading import iso_time
from fer_pipeline.core.contract import IMAGE_SIZE, class_names_for
from fer_pipeline.core.ensemble import combine
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue

__all__ = ["REVIEW_SOURCE", "least_confident_faces", "queue_for_review"]

REVIEW_SOURCE = "request log"


def _served(face: Face, primary: Mapping[str, int]) -> dict[str, tuple[int, np.ndarray]]:
    """The face's answers by the served versions: model -> (version, probabilities)."""
    return {m: (v, np.frombuffer(p, np.float32)) for m, v, p in face.answers
            if primary.get(m) == v}


def _pixels(face: Face) -> np.ndarray:
    return np.frombuffer(face.pixels, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def least_confident_faces(lowest: Sequence[Face], primary: Mapping[str, int],
                          limit: int) -> list[dict[str, Any]]:
    """The page's gallery: pixels and every served model's answer of the least confident
    faces."""
    faces = []
    for face in lowest:
        answers = _served(face, primary)
        if not answers:
            continue
        faces.append({"pixels": _pixels(face), "row": face.key.decode(errors="replace"),
                      "answers": {m: {"class_name": class_names_for(p.size)[int(p.argmax())],
                                      "confidence": float(p.max())}
                                  for m, (_, p) in answers.items()}})
        if len(faces) == limit:
            break
    return faces


def queue_for_review(queue_dir: str, ties: Sequence[Face], lowest: Sequence[Face],
                     primary: Mapping[str, int], tolerance: float,
                     lowest_count: int) -> dict[str, int]:
    """Queues the window's tied faces (answered by every served version) and its
    `lowest_count` lowest-confidence ones; a tie wins over low confidence."""
    chosen: dict[bytes, tuple[str, Face]] = {}
    for face in ties:
        if len(_served(face, primary)) == len(primary) > 1:
            chosen.setdefault(face.key, ("tied", face))
    low = [f for f in lowest if _served(f, primary)][:lowest_count]
    for face in low:
        chosen.setdefault(face.key, ("low confidence", face))
    queued = already = 0
    with ReviewQueue(queue_dir) as queue:
        for why, face in chosen.values():
            predictions = {m: ModelPrediction(v, p) for m, (v, p) in
                           _served(face, primary).items()}
            if len({p.probabilities.size for p in predictions.values()}) > 1:
                continue     # a FER-2013 and a FER+ model: no decision to review
            decision = dataclasses.asdict(combine(
                {m: p.probabilities for m, p in predictions.items()}, tolerance))
            decision["monitor_reason"] = why
            result = queue.record(_pixels(face),
                                  f"{REVIEW_SOURCE} {iso_time(face.stamp or None) or ''}".strip(),
                                  predictions, decision)
            queued += int(result.inserted)
            already += int(not result.inserted)
    return {"queued": queued, "already_queued": already}
