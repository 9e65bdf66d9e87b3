"""Running the exported `serving_examples` signature over the test split, and saving each
model's test-split probabilities for the monitor."""
from __future__ import annotations

import io
from typing import Mapping

import numpy as np

from fer_pipeline.core import fileio
from fer_pipeline.core.calibration import logits_from_probabilities
from fer_pipeline.core.contract import (INPUT_EXAMPLES, NUM_CLASSES, OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES, SIGNATURE_EXAMPLES)
from fer_pipeline.core.ferplus_votes import FERPLUS_CLASS_COUNTS

__all__ = ["BATCH_SIZE", "predict_probabilities", "predict_outputs", "write_test_predictions"]

BATCH_SIZE = 256


def predict_probabilities(saved_model_dir: str, serialized: list[bytes]) -> np.ndarray:
    """Runs a SavedModel's `serving_examples` signature in batches; returns [n, classes]
    floats (7 columns for FER-2013, 8 for FER+)."""
    return predict_outputs(saved_model_dir, serialized)[0]


def predict_outputs(saved_model_dir: str, serialized: list[bytes]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(the served, calibrated probabilities, the logits) of `serving_examples`; a model
    exported before calibration has no logits output: log p stands in (core/calibration.py)."""
    import tensorflow as tf

    fileio.register_filesystem(saved_model_dir)
    loaded = tf.saved_model.load(saved_model_dir)
    if SIGNATURE_EXAMPLES not in loaded.signatures:
        raise ValueError(f"{saved_model_dir} has no {SIGNATURE_EXAMPLES!r} signature "
                         f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures[SIGNATURE_EXAMPLES]
    answers = [signature(**{INPUT_EXAMPLES: tf.constant(serialized[i:i + BATCH_SIZE])})
               for i in range(0, len(serialized), BATCH_SIZE)]
    probs = np.concatenate([a[OUTPUT_PROBABILITIES].numpy() for a in answers]).astype(np.float64)
    # 7 classes (FER-2013) or 8 (FER+ with contempt): the width says which.
    if probs.shape[0] != len(serialized) or probs.shape[1] not in FERPLUS_CLASS_COUNTS:
        raise ValueError(f"{saved_model_dir}: probabilities have shape {probs.shape}, "
                         f"expected ({len(serialized)}, {NUM_CLASSES} or 8)")
    logits = (np.concatenate([a[OUTPUT_LOGITS].numpy() for a in answers]).astype(np.float64)
              if answers and OUTPUT_LOGITS in answers[0] else logits_from_probabilities(probs))
    return probs, logits


def write_test_predictions(path: str, probs_by_model: Mapping[str, np.ndarray]) -> None:
    """Every model's test-split probabilities, [n, classes] float32 per model in file order:
    what `fer-pipeline monitor` compares the served answers (class mix, confidence, review
    rate) with, so it never re-runs a model to know what the evaluation saw."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: np.asarray(probs, np.float32)
                                   for name, probs in probs_by_model.items()})
    fileio.write_bytes(path, buffer.getvalue())
