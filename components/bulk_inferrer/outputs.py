"""What the bulk inferrer's driver writes once the Beam job is done: `predictions.csv`
(sorted by source, row and face) and, with a review queue, the faces that need a person,
queued for `fer-review` with each model's saliency maps."""
from __future__ import annotations

import base64
import csv
import io
from typing import Any, Optional, Sequence

import numpy as np

from fer_pipeline.components.bulk_inferrer.records import ModelVersion
from fer_pipeline.core import fileio
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE, OUTPUT_SALIENCY, SIGNATURE_EXPLAIN
from fer_pipeline.serving.review_queue import ModelPrediction, ReviewQueue, record_if_flagged

__all__ = ["PREDICTION_COLUMNS_HEAD", "PREDICTION_COLUMNS_TAIL", "explanations",
           "prediction_columns", "prediction_order", "queue_for_review", "write_predictions_csv"]

# Explanations are integrated gradients (tens of model calls per face): small batches keep
# the driver's memory flat.
_EXPLAIN_BATCH = 8


PREDICTION_COLUMNS_HEAD = ("source", "row", "face", "box", "label", "usage")
PREDICTION_COLUMNS_TAIL = ("decision", "confidence", "winner", "needs_review", "reason")


def prediction_columns(models: Sequence[str]) -> list[str]:
    per_model = [f"{m}_{c}" for m in models for c in ("class", "confidence", "version")]
    return [*PREDICTION_COLUMNS_HEAD, *per_model, *PREDICTION_COLUMNS_TAIL]


def prediction_order(record: dict[str, Any]) -> tuple:
    return (record["source"], record["row"] or 0, record["face"] or 0)


def write_predictions_csv(path: str, records: Sequence[dict[str, Any]],
                          models: Sequence[str]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(prediction_columns(models))
    for record in records:
        decision = record["decision"]
        cells = [record["source"], _blank(record["row"]), _blank(record["face"]),
                 " ".join(map(str, record["box"])) if record["box"] else "",
                 "" if record["label"] is None else CLASS_NAMES[record["label"]],
                 record["usage"]]
        for model in models:
            answer = record["models"][model]
            probabilities = answer["probabilities"]
            best = int(np.argmax(probabilities))
            cells += [CLASS_NAMES[best], f"{probabilities[best]:.6f}", answer["version"]]
        cells += [decision["class_name"], f"{decision['confidence']:.6f}",
                  decision["winner"], "yes" if decision["needs_human_review"] else "no",
                  decision["reason"]]
        writer.writerow(cells)
    fileio.write_text(path, buffer.getvalue())


def _blank(value: Optional[int]) -> Any:
    return "" if value is None else value


def _review_source(record: dict[str, Any]) -> str:
    """Where a queued face came from, in fer-client's notation."""
    if record["row"] is not None:
        return f"{record['source']}:{record['row']}"
    return f"{record['source']}#face{record['face']}@{record['box']}"


def explanations(model: ModelVersion, pixels: np.ndarray) -> Optional[np.ndarray]:
    """Saliency maps [n, 7, 48, 48] of `pixels` from the model's `explain` signature, or
    None when the SavedModel has none (exported before the signature existed)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(model.path)
    if SIGNATURE_EXPLAIN not in loaded.signatures:
        return None
    explain = loaded.signatures[SIGNATURE_EXPLAIN]
    maps = [explain(pixels=tf.constant(pixels[i:i + _EXPLAIN_BATCH]))[OUTPUT_SALIENCY].numpy()
            for i in range(0, len(pixels), _EXPLAIN_BATCH)]
    return np.concatenate(maps) if maps else None


def queue_for_review(queue_dir: str, flagged: Sequence[dict[str, Any]],
                     models: Sequence[ModelVersion], explain: bool) -> dict[str, Any]:
    """Queues the flagged faces for `fer-review`, each once, with the versions that answered
    and (when the model can explain) their saliency maps."""
    pixels = np.stack([np.frombuffer(base64.b64decode(r["pixels_b64"]), np.uint8)
                       .reshape(IMAGE_SIZE, IMAGE_SIZE) for r in flagged]) if flagged else None
    notes, saliency = [], {}
    for model in models:
        saliency[model.name] = explanations(model, pixels) if explain and flagged else None
        if explain and flagged and saliency[model.name] is None:
            notes.append(f"{model.name} v{model.version}: no {SIGNATURE_EXPLAIN} signature; "
                         "queued without saliency")
    queued = already = 0
    with ReviewQueue(queue_dir) as queue:
        for index, record in enumerate(flagged):
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
    return {"queue": queue_dir, "flagged": len(flagged), "queued": queued,
            "already_queued": already, "notes": notes}
