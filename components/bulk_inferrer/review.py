"""The faces that need a person, queued for `fer-review` by the driver once the job is done.

The queue is one local SQLite file, so this is the one part of bulk inference that runs in
the driver, and the only records that reach it are the flagged faces (the job writes them
to their own shards, `flagged/`; every other record stays in the job's sinks). They are
few (the review rate: a few percent of the faces with the evaluated tolerance), and the
driver reads them a batch at a time, so its memory does not grow with their number either:
each batch gets each model's saliency maps (its `explain` signature: integrated gradients,
tens of model calls per face) and is queued, each face once, with the versions that
answered.
"""
from __future__ import annotations

import base64
import itertools
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from fer_pipeline.components.bulk_inferrer.records import ModelVersion
from fer_pipeline.core.contract import IMAGE_SIZE, OUTPUT_SALIENCY, SIGNATURE_EXPLAIN
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue, record_if_flagged

__all__ = ["explainer", "queue_for_review"]

# Faces read, explained and queued at a time; explanations go through the model in
# smaller batches still (integrated gradients multiply the work per face).
_QUEUE_BATCH = 64
_EXPLAIN_BATCH = 8


def explainer(model: ModelVersion) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """pixels [n, 48, 48] -> saliency maps [n, 7, 48, 48] from the model's `explain`
    signature, or None when the SavedModel has none (exported before it existed)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(model.path)
    if SIGNATURE_EXPLAIN not in loaded.signatures:
        return None
    explain = loaded.signatures[SIGNATURE_EXPLAIN]

    def maps(pixels: np.ndarray) -> np.ndarray:
        _ = loaded   # the signature needs its SavedModel object alive
        return np.concatenate([
            explain(pixels=tf.constant(pixels[i:i + _EXPLAIN_BATCH]))[OUTPUT_SALIENCY].numpy()
            for i in range(0, len(pixels), _EXPLAIN_BATCH)])
    return maps


def _review_source(record: dict[str, Any]) -> str:
    """Where a queued face came from, in fer-client's notation."""
    if record["row"] is not None:
        return f"{record['source']}:{record['row']}"
    return f"{record['source']}#face{record['face']}@{record['box']}"


def queue_for_review(queue_dir: str, flagged: Iterable[dict[str, Any]],
                     models: Sequence[ModelVersion], explain: bool) -> dict[str, Any]:
    """Queues the flagged faces (records with `pixels_b64`, read one at a time) for
    `fer-review`, each once, with the versions that answered and, when the model can
    explain, their saliency maps."""
    explainers: dict[str, Optional[Callable]] = {}
    notes: list[str] = []
    queued = already = total = 0
    records = iter(flagged)
    with ReviewQueue(queue_dir) as queue:
        while batch := list(itertools.islice(records, _QUEUE_BATCH)):
            total += len(batch)
            pixels = np.stack([np.frombuffer(base64.b64decode(r["pixels_b64"]), np.uint8)
                               .reshape(IMAGE_SIZE, IMAGE_SIZE) for r in batch])
            saliency = {}
            for model in models:
                if explain and model.name not in explainers:
                    explainers[model.name] = explainer(model)
                    if explainers[model.name] is None:
                        notes.append(f"{model.name} v{model.version}: no {SIGNATURE_EXPLAIN} "
                                     "signature; queued without saliency")
                maps = explainers.get(model.name)
                saliency[model.name] = maps(pixels) if maps is not None else None
            for index, record in enumerate(batch):
                predictions = {m.name: ModelPrediction(
                    m.version, np.array(record["models"][m.name]["probabilities"]),
                    None if saliency[m.name] is None else saliency[m.name][index])
                    for m in models}
                recorded = record_if_flagged(queue, pixels[index], _review_source(record),
                                             predictions, record["decision"])
                if recorded is not None and recorded.inserted:
                    queued += 1
                else:
                    already += 1
    return {"queue": queue_dir, "flagged": total, "queued": queued,
            "already_queued": already, "notes": notes}
