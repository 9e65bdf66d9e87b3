"""Synthetic FER-2013-format data: procedurally drawn 48x48 faces whose expression follows the label.

The real fer2013.csv cannot be downloaded here, so demos, tests and benchmarks use this
generator. It writes the same columns (`emotion,pixels,Usage`), the same class and Usage
proportions, and faces a small CNN can learn well above chance but not perfectly: pose,
lighting, contrast, noise and occlusion vary per face, and every expression is drawn at a
random intensity, so weak expressions of neighbouring classes (fear/surprise, angry/disgust,
sad/neutral) overlap.

Drawing is vectorized over a batch of faces: each facial part is a soft dark stroke whose
shape parameters are [n, 1, 1] arrays broadcast against the 48x48 pixel grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, USAGE_TO_SPLIT

# FER-2013's real counts; generated files keep these proportions at any size.
FER_CLASS_COUNTS: dict[str, int] = {
    "angry": 4953, "disgust": 547, "fear": 5121, "happy": 8989,
    "sad": 6077, "surprise": 4002, "neutral": 6198}
FER_USAGE_COUNTS: dict[str, int] = {"Training": 28709, "PublicTest": 3589, "PrivateTest": 3589}
CSV_HEADER = "emotion,pixels,Usage"

# Faces are drawn in chunks so 35,887 rows never hold more than a few float arrays of this size.
_CHUNK = 2048

# Per-class expression, as the fully expressed shape of each part (intensity 1.0).
# Columns: mouth_curve (+ corners up), mouth_open_h, mouth_open_w, mouth_width,
# mouth_asym, brow_raise, brow_inner_tilt (+ inner ends up), eye_open, nose_wrinkle.
_EXPRESSION_KEYS = ("mouth_curve", "mouth_open_h", "mouth_open_w", "mouth_width",
                    "mouth_asym", "brow_raise", "brow_inner_tilt", "eye_open", "nose_wrinkle")
_NEUTRAL = dict(mouth_curve=0.0, mouth_open_h=0.0, mouth_open_w=0.0, mouth_width=6.0,
                mouth_asym=0.0, brow_raise=0.0, brow_inner_tilt=0.0, eye_open=1.7,
                nose_wrinkle=0.0)
_EXPRESSIONS: dict[str, dict[str, float]] = {
    "angry": dict(_NEUTRAL, mouth_curve=-0.6, mouth_width=5.0, brow_raise=-1.5,
                  brow_inner_tilt=-2.5, eye_open=0.9),
    "disgust": dict(_NEUTRAL, mouth_curve=-0.8, mouth_asym=2.2, brow_raise=-0.8,
                    brow_inner_tilt=-1.2, eye_open=1.0, nose_wrinkle=1.0),
    "fear": dict(_NEUTRAL, mouth_open_h=2.2, mouth_open_w=6.5, mouth_width=7.5,
                 mouth_curve=-0.6, brow_raise=2.0, brow_inner_tilt=1.5, eye_open=2.6),
    "happy": dict(_NEUTRAL, mouth_curve=2.6, mouth_open_h=1.0, mouth_open_w=5.0,
                  mouth_width=8.0, eye_open=1.3),
    "sad": dict(_NEUTRAL, mouth_curve=-2.0, mouth_width=5.5, brow_inner_tilt=2.5,
                brow_raise=0.3, eye_open=1.3),
    "surprise": dict(_NEUTRAL, mouth_open_h=4.5, mouth_open_w=3.8, mouth_width=4.0,
                     brow_raise=3.0, eye_open=2.8),
    "neutral": dict(_NEUTRAL),
}
_EXPRESSION_TABLE = np.array(
    [[_EXPRESSIONS[name][key] for key in _EXPRESSION_KEYS] for name in CLASS_NAMES],
    dtype=np.float32)
_NEUTRAL_ROW = np.array([_NEUTRAL[key] for key in _EXPRESSION_KEYS], dtype=np.float32)


@dataclass
class SynthResult:
    path: str
    rows: int
    seed: int
    label_counts: dict[str, int] = field(default_factory=dict)
    usage_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def allocate(counts: dict[str, int], total: int) -> dict[str, int]:
    """Splits `total` in the proportions of `counts` (largest remainder, so sums are exact)."""
    weights = np.array(list(counts.values()), dtype=np.float64)
    exact = weights / weights.sum() * total
    allocated = np.floor(exact).astype(int)
    by_remainder = np.argsort(-(exact - allocated), kind="stable")
    allocated[by_remainder[: total - allocated.sum()]] += 1
    return dict(zip(counts.keys(), allocated.tolist()))


def draw_faces(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws one 48x48 grayscale face per label (0-6); returns uint8 [n, 48, 48]."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}")
    chunks = [_draw_chunk(labels[i:i + _CHUNK], rng) for i in range(0, len(labels), _CHUNK)]
    if not chunks:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return np.concatenate(chunks)


def _col(values: np.ndarray) -> np.ndarray:
    """Per-face parameters as [n, 1, 1] so they broadcast against the pixel grid."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _expression_params(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Interpolates each face between neutral and its class by a random intensity, plus jitter.

    Low intensities make classes overlap, which is what keeps a CNN from reaching 100 %.
    """
    n = len(labels)
    intensity = rng.beta(2.2, 1.4, size=n).astype(np.float32)
    target = _EXPRESSION_TABLE[labels]
    params = _NEUTRAL_ROW + intensity[:, None] * (target - _NEUTRAL_ROW)
    # Individual differences between people, independent of the expression.
    jitter_scale = np.array([0.5, 0.4, 0.8, 0.8, 0.6, 0.8, 0.8, 0.35, 0.25], np.float32)
    params = params + rng.normal(size=params.shape).astype(np.float32) * jitter_scale
    params[:, 1] = np.maximum(params[:, 1], 0.0)        # mouth_open_h
    params[:, 2] = np.maximum(params[:, 2], 1.0)        # mouth_open_w
    params[:, 3] = np.clip(params[:, 3], 3.0, 10.0)     # mouth_width
    params[:, 7] = np.clip(params[:, 7], 0.5, 3.2)      # eye_open
    params[:, 8] = np.clip(params[:, 8], 0.0, 1.5)      # nose_wrinkle
    # Half the time the asymmetry goes to the other side of the face.
    params[:, 4] *= rng.choice(np.array([-1.0, 1.0], np.float32), size=n)
    return {key: _col(params[:, i]) for i, key in enumerate(_EXPRESSION_KEYS)}


def _face_coordinates(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Face-local (u, v) coordinates of every pixel under a random offset, scale and tilt."""
    grid = np.arange(IMAGE_SIZE, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    cx = _col(23.5 + rng.normal(0, 1.8, n))
    cy = _col(24.0 + rng.normal(0, 1.8, n))
    scale = _col(rng.uniform(0.85, 1.12, n))
    tilt = _col(rng.normal(0, 0.10, n))
    dx, dy = xx - cx, yy - cy
    cos, sin = np.cos(tilt), np.sin(tilt)
    u = (dx * cos + dy * sin) / scale
    v = (-dx * sin + dy * cos) / scale
    return u, v


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function written with tanh so large inputs do not overflow exp."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _stroke(distance: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Soft line darkness in [0, 1] from a distance to the line's centre."""
    return np.exp(-0.5 * (distance / width) ** 2)


def _segment_mask(u: np.ndarray, half_length: np.ndarray, centre: float | np.ndarray = 0.0) -> np.ndarray:
    """Soft 1 inside |u - centre| < half_length, fading out over a pixel."""
    return _sigmoid((half_length - np.abs(u - centre)) * 2.0)


def _mouth(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    width = p["mouth_width"]
    rel = u / width
    # Curve: corners move up (smaller v) for positive curvature; asymmetry lifts one corner.
    line_v = 9.5 - p["mouth_curve"] * rel ** 2 - p["mouth_asym"] * np.clip(rel, 0, None) ** 2
    lips = _stroke(v - line_v, 0.8) * _segment_mask(u, width)
    opening = ((u / p["mouth_open_w"]) ** 2 + ((v - 9.5) / np.maximum(p["mouth_open_h"], 1e-3)) ** 2)
    open_mouth = (opening < 1.0) * np.minimum(p["mouth_open_h"], 1.0)
    return np.maximum(lips, open_mouth)


def _brows(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    darkness = np.zeros_like(u)
    for side in (-1.0, 1.0):
        # Position along the brow: 0 at the inner end (near the nose), 1 at the outer end.
        along = np.clip((side * u - 2.0) / 7.0, 0.0, 1.0)
        line_v = -9.0 - p["brow_raise"] - p["brow_inner_tilt"] * (1.0 - along)
        darkness = np.maximum(darkness, _stroke(v - line_v, 0.9) * _segment_mask(u, 3.6, side * 5.5))
    return darkness


def _eyes(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    darkness = np.zeros_like(u)
    for side in (-1.0, 1.0):
        ellipse = ((u - side * 6.0) / 2.8) ** 2 + ((v + 4.0) / p["eye_open"]) ** 2
        darkness = np.maximum(darkness, _sigmoid((1.0 - ellipse) * 5.0))
    return darkness


def _nose(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    nostrils = 0.45 * (_stroke(np.hypot(u - 1.6, v - 4.0), 0.8) + _stroke(np.hypot(u + 1.6, v - 4.0), 0.8))
    # Disgust wrinkles: short horizontal creases on the bridge of the nose.
    wrinkles = sum(_stroke(v - row, 0.5) for row in (-1.5, 0.5)) * _segment_mask(u, 2.0)
    return np.maximum(nostrils, wrinkles * p["nose_wrinkle"] * 0.7)


def _draw_chunk(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    u, v = _face_coordinates(n, rng)
    p = _expression_params(labels, rng)

    background = _col(rng.uniform(20, 120, n))
    skin = _col(rng.uniform(120, 210, n))
    face = _sigmoid((1.0 - (u / 17.0) ** 2 - (v / 21.0) ** 2) * 8.0)
    image = background + (skin - background) * face

    features = np.maximum.reduce([_mouth(u, v, p), _brows(u, v, p), _eyes(u, v, p), _nose(u, v, p)])
    depth = _col(rng.uniform(0.45, 0.8, n))
    image = image * (1.0 - depth * features * face)

    # Lighting: a linear gradient in a random direction, then global contrast and noise.
    angle = _col(rng.uniform(0, 2 * np.pi, n))
    strength = _col(rng.uniform(0.0, 0.45, n))
    gradient = (np.cos(angle) * u + np.sin(angle) * v) / 24.0
    image = image * (1.0 + strength * gradient)
    contrast = _col(rng.uniform(0.6, 1.3, n))
    image = (image - 128.0) * contrast + 128.0 + _col(rng.normal(0, 12, n))
    image = image + rng.normal(size=image.shape).astype(np.float32) * _col(rng.uniform(3, 14, n))
    _occlude(image, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _occlude(image: np.ndarray, rng: np.random.Generator) -> None:
    """Covers a random rectangle on about a fifth of the faces (hands, hair, glasses, text)."""
    n = len(image)
    chosen = np.flatnonzero(rng.random(n) < 0.2)
    for i in chosen:
        h, w = rng.integers(6, 18, size=2)
        top, left = rng.integers(0, IMAGE_SIZE - h), rng.integers(0, IMAGE_SIZE - w)
        image[i, top:top + h, left:left + w] = rng.uniform(0, 255)


def _pixel_token_table() -> tuple[np.ndarray, np.ndarray]:
    """Bytes of "v " for every value 0-255 (padded to 4) and each token's true length."""
    table = np.zeros((256, 4), np.uint8)
    lengths = np.zeros(256, np.int64)
    for value in range(256):
        token = f"{value} ".encode()
        table[value, :len(token)] = np.frombuffer(token, np.uint8)
        lengths[value] = len(token)
    return table, lengths


_TOKENS, _TOKEN_LENGTHS = _pixel_token_table()
_TOKEN_MASK = np.arange(4)[None, :] < _TOKEN_LENGTHS[:, None]


def encode_pixel_strings(images: np.ndarray) -> list[bytes]:
    """FER-2013's pixel field for each image: 2304 space-separated decimals.

    Vectorized (a table lookup and one boolean gather per batch) because formatting 80 M
    integers one by one in Python takes minutes.
    """
    flat = images.reshape(len(images), -1)
    tokens = _TOKENS[flat][_TOKEN_MASK[flat]]
    ends = np.cumsum(_TOKEN_LENGTHS[flat].sum(axis=1))
    starts = np.concatenate([[0], ends[:-1]])
    buffer = tokens.tobytes()
    return [buffer[s:e - 1] for s, e in zip(starts.tolist(), ends.tolist())]  # drop last space


def _shuffled_labels(rows: int, rng: np.random.Generator) -> np.ndarray:
    per_class = allocate(FER_CLASS_COUNTS, rows)
    labels = np.concatenate([np.full(count, CLASS_NAMES.index(name), np.int64)
                             for name, count in per_class.items()])
    return rng.permutation(labels)


def _stratified_usage(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Usage values with FER-2013's exact totals, split in the same proportions in every class.

    Drawing Usage independently of the label would give small CSVs label drift between
    splits from sampling noise alone (which the validator rightly flags), so: a sequence
    whose every prefix has the Usage proportions (largest deficit first) is laid over the
    rows grouped by class, in random order within each class.
    """
    rows = len(labels)
    per_usage = allocate(FER_USAGE_COUNTS, rows)
    names = list(per_usage)
    targets = np.array(list(per_usage.values()), dtype=np.float64)
    assigned = np.zeros(len(names))
    sequence = np.empty(rows, dtype=object)
    for i in range(rows):
        k = int(np.argmax(targets * (i + 1) / rows - assigned))
        assigned[k] += 1
        sequence[i] = names[k]
    by_class = np.lexsort((rng.random(rows), labels))
    usage = np.empty(rows, dtype=object)
    usage[by_class] = sequence
    return usage


def generate_csv(out_path: str, rows: int, seed: int = 0, include_usage: bool = True) -> SynthResult:
    """Writes a FER-2013-format CSV of `rows` synthetic faces; same seed, same bytes."""
    started = time.time()
    rng = np.random.default_rng(seed)
    labels = _shuffled_labels(rows, rng)
    usage = _stratified_usage(labels, rng)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        f.write((CSV_HEADER if include_usage else "emotion,pixels").encode() + b"\n")
        for start in range(0, rows, _CHUNK):
            chunk_labels = labels[start:start + _CHUNK]
            pixel_fields = encode_pixel_strings(_draw_chunk(chunk_labels, rng))
            lines = []
            for i, pixels in enumerate(pixel_fields):
                line = str(chunk_labels[i]).encode() + b"," + pixels
                if include_usage:
                    line += b"," + usage[start + i].encode()
                lines.append(line)
            f.write(b"\n".join(lines) + b"\n")
    label_counts = {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)}
    usage_counts = ({name: int((usage == name).sum()) for name in USAGE_TO_SPLIT}
                    if include_usage else {})
    return SynthResult(path=str(out_path), rows=rows, seed=seed, label_counts=label_counts,
                       usage_counts=usage_counts, seconds=round(time.time() - started, 3))
