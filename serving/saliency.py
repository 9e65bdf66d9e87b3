"""Pictures of faces and of why a model answered what it did, as PNG bytes.

The maps themselves come from each model's `explain` signature (integrated gradients,
core/serving_export.py); this module only draws them: the 48x48 face enlarged with
nearest-neighbour (so every original pixel stays a visible square) and, for an overlay,
the map as a heat colour blended over the face in proportion to its value, so the parts of
the face the model did not rely on stay visible. Used by `fer-client --explain` and by the
review app (`fer-review`).
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import cv2
import numpy as np

from fer_pipeline.core.contract import IMAGE_SIZE, class_names_for

DEFAULT_SCALE = 6                 # 48 px -> 288 px
# Integrated-gradients maps are speckled pixel by pixel and a few pixels take the peak; for
# display only, a 1-pixel Gaussian blur makes regions readable without moving them, and the
# top DISPLAY_SATURATE_PERCENT of the pixels show at full heat.
DISPLAY_BLUR_SIGMA = 1.0
DISPLAY_SATURATE_PERCENT = 2.0
MAX_ALPHA = 0.65                  # how opaque the hottest point of an overlay is
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def _face_grid(pixels: np.ndarray) -> np.ndarray:
    face = np.asarray(pixels)
    if face.size != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"a face is {IMAGE_SIZE}x{IMAGE_SIZE} pixels, got {face.size} values")
    return face.reshape(IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)


def _enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def face_image(pixels: np.ndarray, scale: int = DEFAULT_SCALE) -> np.ndarray:
    """The face as a BGR image, `scale` times larger."""
    return _enlarge(cv2.cvtColor(_face_grid(pixels), cv2.COLOR_GRAY2BGR), scale)


def overlay_image(pixels: np.ndarray, saliency_map: np.ndarray,
                  scale: int = DEFAULT_SCALE) -> np.ndarray:
    """The face with one saliency map (48x48, values in [0, 1]) blended over it, BGR."""
    heat = np.clip(np.asarray(saliency_map, dtype=np.float32), 0.0, 1.0)
    if heat.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"a saliency map is {IMAGE_SIZE}x{IMAGE_SIZE}, got {list(heat.shape)}")
    heat = cv2.GaussianBlur(heat, (0, 0), DISPLAY_BLUR_SIGMA)
    ceiling = float(np.percentile(heat, 100.0 - DISPLAY_SATURATE_PERCENT))
    if ceiling <= 0:
        ceiling = float(heat.max())
    heat = np.clip(heat / ceiling, 0.0, 1.0) if ceiling > 0 else heat
    colours = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    face = cv2.cvtColor(_face_grid(pixels), cv2.COLOR_GRAY2BGR).astype(np.float32)
    alpha = (MAX_ALPHA * heat)[..., None]
    blended = np.round(face * (1 - alpha) + colours.astype(np.float32) * alpha)
    return _enlarge(blended.astype(np.uint8), scale)


def png_bytes(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return encoded.tobytes()


def face_png(pixels: np.ndarray, scale: int = DEFAULT_SCALE) -> bytes:
    return png_bytes(face_image(pixels, scale))


def overlay_png(pixels: np.ndarray, saliency_map: np.ndarray,
                scale: int = DEFAULT_SCALE) -> bytes:
    return png_bytes(overlay_image(pixels, saliency_map, scale))


def write_overlays(out_dir: str, index: int, pixels: np.ndarray,
                   explained: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   scale: int = DEFAULT_SCALE) -> list[str]:
    """For face number `index`: one PNG per model showing that model's top class map.

    `explained` maps model name to (probabilities [7], saliency [7, 48, 48]); a FER+ model
    has 8 of each and names its class 7 `contempt`. Files are
    named face<index>_<model>_<class>.png; names are reduced to safe characters.
    Returns the paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for model, (probabilities, saliency) in explained.items():
        top = int(np.argmax(probabilities))
        name = f"face{index:03d}_{_safe(model)}_{class_names_for(np.size(probabilities))[top]}.png"
        path = os.path.join(out_dir, name)
        with open(path, "wb") as handle:
            handle.write(overlay_png(pixels, saliency[top], scale))
        written.append(path)
    return written


def _safe(name: str) -> str:
    return _SAFE_NAME.sub("_", name).strip("._") or "model"


def top_classes(probabilities: np.ndarray, count: int = 3) -> list[tuple[int, float]]:
    """The `count` most probable classes, most probable first: (class id, probability)."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    order = np.argsort(-probs, kind="stable")[:count]
    return [(int(i), float(probs[i])) for i in order]
