"""What a request's inputs must be before TensorFlow sees them.

Every input is checked in two layers, and a request that fails either gets a short
INVALID_ARGUMENT (REST 400 `{"error": ...}`) naming the input, what was expected and what
came, instead of TensorFlow's reshape or assertion dump:

1. The signature's declared TensorSpec: dtype, rank and every fixed dimension.
2. The faces contract (core/contract.py) for integer `pixels` inputs. Our exported
   signatures declare `pixels` with an unknown shape, so that one signature takes both
   [batch, 48, 48] and [batch, 2304]; TensorFlow alone would turn any tensor whose size is a
   multiple of 2,304 into that many faces (one 4,608-value instance became two
   predictions). So each instance must be exactly one face, 48x48 or 2,304 values, each
   0-255: one prediction per instance, which is TF Serving's row-format contract.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from fer_pipeline.core.contract import IMAGE_SIZE, INPUT_PIXELS, NUM_PIXELS

PIXEL_MIN, PIXEL_MAX = 0, 255
# The shapes one face may have inside a batch.
FACE_SHAPES = ((IMAGE_SIZE, IMAGE_SIZE), (NUM_PIXELS,))


def input_problem(key: str, array: np.ndarray, spec: tf.TensorSpec) -> Optional[str]:
    """Why `array` cannot be the signature input `key` declared by `spec`, or None."""
    return _spec_problem(key, array, spec) or _face_problem(key, array, spec)


def _spec_problem(key: str, array: np.ndarray, spec: tf.TensorSpec) -> Optional[str]:
    if array.dtype != spec.dtype.as_numpy_dtype and not (
            spec.dtype == tf.string and array.dtype.kind in "SUO"):
        return f"input {key!r} has dtype {array.dtype}, signature expects {spec.dtype.name}"
    if not spec.shape.is_compatible_with(array.shape):
        return (f"input {key!r} has shape {list(array.shape)}, signature expects "
                f"{_shape_text(spec.shape)}")
    return None


def _face_problem(key: str, array: np.ndarray, spec: tf.TensorSpec) -> Optional[str]:
    if key != INPUT_PIXELS or not spec.dtype.is_integer:
        return None
    expected = f"[n, {IMAGE_SIZE}, {IMAGE_SIZE}] or [n, {NUM_PIXELS}]"
    if array.ndim == 0 or tuple(array.shape[1:]) not in FACE_SHAPES:
        instance = list(array.shape[1:]) if array.ndim else []
        return (f"input {key!r} has shape {list(array.shape)}: each instance must be one "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} face ({NUM_PIXELS} values), so the input must be "
                f"{expected}; got instance(s) of shape {instance}")
    if array.size and (array.min() < PIXEL_MIN or array.max() > PIXEL_MAX):
        bad = array.min() if array.min() < PIXEL_MIN else array.max()
        return (f"input {key!r}: pixel values must be {PIXEL_MIN}-{PIXEL_MAX}, got {bad}")
    return None


def _shape_text(shape: tf.TensorShape) -> str:
    if shape.rank is None:
        return "any shape"
    return "[" + ", ".join("n" if d is None else str(d) for d in shape.as_list()) + "]"
