"""The way into human review: faces the ensemble flagged are explained and queued.

`fer-client --review-queue DIR` calls `queue_flagged` after combining the models: each
face whose decision needs a person is sent once more to every model's `explain` signature
(one face per request, so a slow model's explanation stays within the client's timeout)
and recorded in the review queue with both models' probabilities, versions and saliency.
A model that cannot explain (a SavedModel exported before the signature existed, or a
newer version than the one that answered) is queued without maps, with a note saying so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from fer_pipeline.serving.client import Explanation, FerClient, ServerError
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue, record_if_flagged


@dataclass
class IntakeSummary:
    flagged: int = 0                  # faces whose decision needed a person
    queued: int = 0                   # of those, new to the queue
    already_queued: int = 0           # of those, the same face was queued before
    notes: list[str] = field(default_factory=list)


def explain_face(client: FerClient, models: Sequence[str], pixels: np.ndarray,
                 notes: Optional[list[str]] = None) -> dict[str, Optional[Explanation]]:
    """Each model's explanation of one face; None (and a note) for a model that cannot."""
    explained: dict[str, Optional[Explanation]] = {}
    for model in models:
        try:
            explained[model] = client.explain(model, np.asarray(pixels)[None])
        except ServerError as error:
            explained[model] = None
            note = f"{model}: no saliency ({error})"
            if notes is not None and note not in notes:
                notes.append(note)
    return explained


def _prediction(answer: dict[str, Any], explanation: Optional[Explanation],
                model: str, notes: list[str]) -> ModelPrediction:
    # In the model's class order (classify's dicts keep it): 7 classes, or FER+'s 8.
    probabilities = np.array(list(answer["probabilities"].values()))
    saliency = None
    if explanation is not None:
        if explanation.version == answer["version"]:
            saliency = explanation.saliency[0]
        else:  # a new version was pushed in between: its maps would explain another model
            notes.append(f"{model}: version {explanation.version} explained, version "
                         f"{answer['version']} answered; queued without saliency")
    return ModelPrediction(answer["version"], probabilities, saliency)


def queue_flagged(client: FerClient, queue: ReviewQueue, faces: Sequence[np.ndarray],
                  sources: Sequence[str], results: Sequence[dict[str, Any]],
                  models: Sequence[str]) -> IntakeSummary:
    """Queues every face whose ensemble decision (in `results`, from fer_pipeline.serving.client.classify,
    aligned with `faces` and `sources`) needs human review."""
    summary = IntakeSummary()
    for pixels, source, result in zip(faces, sources, results):
        if not result["decision"]["needs_human_review"]:
            continue
        summary.flagged += 1
        # The models that answered for this face (a model that is not served has none).
        answered = [model for model in models if model in result["models"]]
        explained = explain_face(client, answered, pixels, summary.notes)
        predictions = {model: _prediction(result["models"][model], explained[model], model,
                                          summary.notes)
                       for model in answered}
        recorded = record_if_flagged(queue, pixels, source, predictions, result["decision"])
        if recorded is not None and recorded.inserted:
            summary.queued += 1
        else:
            summary.already_queued += 1
    return summary
