"""Warm start: a training run that begins from the weights of the version serving now.

The served version is found in the serving root (core/serving_root.py, what models.config
makes TF Serving load). Its SavedModel is our own export (export.py): besides the
signatures it keeps the Keras model's variables, in the model's order, as
`model_variables`, so the weights come straight from what is served, with no other copy
to keep. They are used only when they fit: the version answers the contract's signatures
with 7 probabilities, and its variables have the new model's shapes, one for one (the same
architecture, width included). Otherwise the run starts fresh, and the record says why.
"""
from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf

from fer_pipeline.core.artifacts import fingerprint
from fer_pipeline.core.contract import (NUM_CLASSES, OUTPUT_PROBABILITIES, SIGNATURE_DEFAULT,
                                        SIGNATURE_EXAMPLES, SIGNATURE_EXPLAIN, SIGNATURE_UINT8)
from fer_pipeline.core.serving_root import latest_served_version

__all__ = ["warm_start"]

CONTRACT_SIGNATURES = (SIGNATURE_DEFAULT, SIGNATURE_UINT8, SIGNATURE_EXAMPLES, SIGNATURE_EXPLAIN)


def warm_start(model: keras.Model, model_name: str, serving_root: str) -> dict[str, Any]:
    """Loads the served version of `model_name` into `model` when it fits.

    Returns the record the trainer keeps: `used`, a one-line `summary`, and for a version
    that was found its `base_version`, `base_path`, `base_fingerprint` and `serving_root`.
    """
    served = latest_served_version(serving_root, model_name) if serving_root else None
    if served is None:
        return {"used": False, "summary": f"starts fresh: no {model_name} version is served "
                f"under {serving_root or 'the serving root'} to warm-start from"}
    version, path = served
    record = {"base_version": version, "base_path": path, "serving_root": serving_root}
    reason = _load(model, path)
    if reason:
        return {**record, "used": False,
                "summary": f"starts fresh, not from served version {version}: {reason}"}
    return {**record, "used": True, "base_fingerprint": fingerprint(path),
            "summary": f"warm start from served version {version} ({path})"}


def _load(model: keras.Model, path: str) -> Optional[str]:
    """Assigns the SavedModel's weights to `model`; the reason it cannot, or None."""
    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as error:
        return f"it cannot be loaded ({str(error).splitlines()[0][:120]})"
    missing = [name for name in CONTRACT_SIGNATURES if name not in loaded.signatures]
    if missing:
        return f"its contract differs (no {', '.join(missing)} signature)"
    outputs = loaded.signatures[SIGNATURE_DEFAULT].structured_outputs
    probabilities = outputs.get(OUTPUT_PROBABILITIES)
    if probabilities is None or probabilities.shape[-1] != NUM_CLASSES:
        return f"its contract differs (no {NUM_CLASSES}-class {OUTPUT_PROBABILITIES} output)"
    saved = list(getattr(loaded, "model_variables", None) or [])
    if not saved:
        return "it keeps no Keras weights (not exported by this trainer)"
    ours = model.variables
    if len(saved) != len(ours):
        return f"its architecture differs ({len(saved)} weights, this model has {len(ours)})"
    for mine, theirs in zip(ours, saved):
        if tuple(mine.shape) != tuple(theirs.shape):
            return (f"its architecture differs ({mine.path}: {tuple(theirs.shape)} served, "
                    f"{tuple(mine.shape)} here)")
    for mine, theirs in zip(ours, saved):
        mine.assign(tf.cast(theirs, mine.dtype))
    return None
