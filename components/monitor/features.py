"""Image features of the served faces and the TFDV statistics they are compared by.

Per face, features a person understands (brightness, contrast, clipped dark / bright,
sharpness), measured in the Beam workers (`measure`, one record's faces at a time); and the
statistics of per-face columns in the in-memory form TFDV validates, for the reference's
train split (the served window's statistics are TFDV's Beam transform's, job.py).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
from tensorflow_data_validation.statistics import stats_impl, stats_options
from tensorflow_metadata.proto.v0 import statistics_pb2

from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import FEATURE_PIXELS, NUM_PIXELS

__all__ = ["IMAGE_FEATURES", "CATEGORICAL_FEATURES", "NUMBERS", "CLIPPED", "NOT_CLIPPED",
           "MAX_PIXEL_FACES", "measure", "image_features", "statistics", "feature_stats"]

# Pixel statistics look at 2,304 values per face; above about this many faces a
# deterministic sample of them (job.py) gives the same histogram (to three decimals) at a
# fraction of the time.
MAX_PIXEL_FACES = 20_000

# The image features, in the order the page shows them: name -> (what it is, config field
# of its threshold). Numbers are compared by Jensen-Shannon divergence; the two exposure
# features are categories per face (clipped or not), compared by L-infinity: the share of
# faces with many near-black (near-white) pixels. Each feature is chosen to move with one
# kind of change only: brightness does not move contrast or sharpness, contrast moves
# neither brightness nor sharpness (sharpness is relative to the face's own contrast).
IMAGE_FEATURES: dict[str, tuple[str, str]] = {
    "brightness": ("mean pixel value of a face (0 black - 255 white)", "brightness_js"),
    "contrast": ("standard deviation of a face's pixels", "contrast_js"),
    "dark_share": ("share of faces whose near-black pixels exceed clipped_share",
                   "dark_share_linf"),
    "bright_share": ("share of faces whose near-white pixels exceed clipped_share",
                     "bright_share_linf"),
    "sharpness": ("variance of the Laplacian over the face's variance (low: blurred)",
                  "sharpness_js"),
}
CATEGORICAL_FEATURES = ("dark_share", "bright_share")
CLIPPED, NOT_CLIPPED = b"clipped", b"not clipped"
# The order of the numbers `measure` returns (an Answer carries them as a tuple).
NUMBERS = tuple(IMAGE_FEATURES)


def measure(pixels: np.ndarray, config: MonitorConfig) -> tuple[np.ndarray, ...]:
    """Per face, every feature as a number (float64 [n], NUMBERS order)."""
    numbers = _measure(pixels, config)
    return tuple(numbers[name] for name in NUMBERS)


def _measure(pixels: np.ndarray, config: MonitorConfig) -> dict[str, np.ndarray]:
    """Per face, every feature as a number (float64 [n]); the exposure ones as shares."""
    n = len(pixels)
    numbers = {name: np.zeros(n) for name in NUMBERS}
    for start in range(0, n, 4096):   # bounded float copies for 100,000s of faces
        chunk = pixels[start:start + 4096].astype(np.float32)
        flat = chunk.reshape(len(chunk), -1)
        rows = slice(start, start + len(chunk))
        numbers["brightness"][rows] = flat.mean(axis=1)
        variance = flat.var(axis=1)
        numbers["contrast"][rows] = np.sqrt(variance)
        numbers["dark_share"][rows] = (flat <= config.dark_level).mean(axis=1)
        numbers["bright_share"][rows] = (flat >= config.bright_level).mean(axis=1)
        # 4-neighbour Laplacian on the interior: its variance falls when edges soften;
        # divided by the face's variance so a contrast change alone does not move it.
        laplacian = (chunk[:, :-2, 1:-1] + chunk[:, 2:, 1:-1] + chunk[:, 1:-1, :-2]
                     + chunk[:, 1:-1, 2:] - 4 * chunk[:, 1:-1, 1:-1])
        numbers["sharpness"][rows] = laplacian.reshape(len(chunk), -1).var(axis=1) / \
            np.maximum(variance, 1.0)
    return numbers


def image_features(pixels: np.ndarray, config: MonitorConfig) -> dict[str, np.ndarray]:
    """Per face: brightness, contrast and sharpness (float64 [n]) and whether it is
    clipped dark / bright (bytes [n]); see IMAGE_FEATURES."""
    numbers = _measure(pixels, config)
    features: dict[str, np.ndarray] = {}
    for name in IMAGE_FEATURES:
        if name in CATEGORICAL_FEATURES:
            features[name] = np.where(numbers[name] > config.clipped_share, CLIPPED,
                                      NOT_CLIPPED)
        else:
            features[name] = numbers[name]
    return features


def _list_column(values: np.ndarray, width: int = 1) -> pa.Array:
    flat = np.ascontiguousarray(values).reshape(-1)
    offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat))


def statistics(columns: Mapping[str, np.ndarray],
               pixels: Optional[np.ndarray] = None) -> statistics_pb2.DatasetFeatureStatisticsList:
    """TFDV statistics of per-face columns (numbers or strings) and, optionally, of every
    pixel (the same decoded view as components/statistics/executor.py: one int64 per pixel)."""
    arrays, names = [], []
    for name, values in columns.items():
        arrays.append(_list_column(np.asarray(values)))
        names.append(name)
    if pixels is not None:
        arrays.append(_list_column(pixels.astype(np.int64), NUM_PIXELS))
        names.append(FEATURE_PIXELS)
    batch = pa.RecordBatch.from_arrays(arrays, names)
    return stats_impl.generate_statistics_in_memory(batch, stats_options.StatsOptions())


def feature_stats(stats: statistics_pb2.DatasetFeatureStatisticsList,
                  name: str) -> Optional[statistics_pb2.FeatureNameStatistics]:
    """The statistics of feature `name` in the first dataset, None if it has none."""
    for feature in stats.datasets[0].features:
        if (feature.path.step and feature.path.step[0] == name) or feature.name == name:
            return feature
    return None
