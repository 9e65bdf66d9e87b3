"""Time windows: the same checks per `monitor.window_minutes` slice of the traffic.

A drift that starts mid-window shows in the slices after it; each slice is measured like
the whole window, without the pixel histogram (the costliest statistic).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from fer_pipeline.components.monitor.answers import served_answers, summary_numbers
from fer_pipeline.components.monitor.comparison import compare
from fer_pipeline.components.monitor.reading import Traffic, iso_time
from fer_pipeline.components.monitor.reference import LoadedReference
from fer_pipeline.core.config import MonitorConfig

__all__ = ["window_bounds", "window_checks"]


def window_bounds(timestamps: np.ndarray, minutes: float) -> list[tuple[int, int]]:
    """[start, end) in epoch seconds of every window of `minutes` from the first known
    timestamp's window to the last one's (aligned to multiples of the width)."""
    known = timestamps[timestamps > 0]
    if not len(known) or minutes <= 0:
        return []
    width = int(minutes * 60)
    first = int(known.min()) // width * width
    return [(start, start + width) for start in range(first, int(known.max()) + 1, width)]


def _slice(traffic: Traffic, inside: np.ndarray) -> Traffic:
    """The traffic rows selected by the mask `inside`."""
    return dataclasses.replace(
        traffic, pixels=traffic.pixels[inside], models=traffic.models[inside],
        versions=traffic.versions[inside], probabilities=traffic.probabilities[inside],
        timestamps=traffic.timestamps[inside])


def window_checks(traffic: Traffic, features: Mapping[str, np.ndarray],
                  primary: Mapping[str, int], face_rows: np.ndarray, ref: LoadedReference,
                  config: MonitorConfig, tolerance: float) -> list[dict[str, Any]]:
    """The same numbers per time window of `config.window_minutes` (no pixel histogram)."""
    windows = []
    for start, end in window_bounds(traffic.timestamps[face_rows], config.window_minutes):
        inside = (traffic.timestamps >= start) & (traffic.timestamps < end)
        rows = face_rows[inside[face_rows]]
        if not len(rows):
            continue
        part = _slice(traffic, inside)
        answers, _, _ = served_answers(part, primary, tolerance)
        # The window's face rows, renumbered as rows of the slice.
        position = np.searchsorted(np.flatnonzero(inside), rows)
        checks, _ = compare(position, part, {n: v[inside] for n, v in features.items()},
                            answers, ref, config, include_pixels=False,
                            judged=len(rows) >= config.min_requests)
        windows.append({"start": iso_time(start), "end": iso_time(end),
                        "faces": int(len(rows)), **summary_numbers(answers),
                        "distances": {c["name"]: c["distance"] for c in checks},
                        "alerts": [c["name"] for c in checks if c["alert"]]})
    return windows
