"""Time windows: the same checks per `monitor.window_minutes` slice of the traffic, and
each window against the one before it.

A drift that starts mid-window shows in the slices after it; each slice is measured like
the whole window, without the pixel histogram (the costliest statistic), from its slice
of the job's statistics (TFDV slices them by the `window` feature, job.py). A window is
also compared with the previous one by TFDV's `drift_comparator` (the same distances and
thresholds as the skew against training): a change from one hour to the next shows even
while both are still close enough to the training data.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import tensorflow_data_validation as tfdv
from tensorflow_data_validation import constants as tfdv_constants
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from fer_pipeline.components.monitor.answers import REVIEW_FEATURE, summary_from_counts
from fer_pipeline.components.monitor.comparison import (REVIEW_CHECK, answer_names, compare,
    served_subset)
from fer_pipeline.components.monitor.features import CATEGORICAL_FEATURES, IMAGE_FEATURES
from fer_pipeline.components.monitor.job import CONFIDENCE_UNIT, Collected, window_slice
from fer_pipeline.components.monitor.reading import iso_time
from fer_pipeline.components.monitor.reference import LoadedReference
from fer_pipeline.core.config import MonitorConfig

__all__ = ["WHOLE_WINDOW", "slice_of", "drift_schema", "drift_checks", "window_checks"]

WHOLE_WINDOW = tfdv_constants.DEFAULT_SLICE_KEY     # TFDV's name for the unsliced dataset


def slice_of(stats: statistics_pb2.DatasetFeatureStatisticsList,
             name: str) -> Optional[statistics_pb2.DatasetFeatureStatistics]:
    """The dataset of slice `name` (WHOLE_WINDOW: every face), None if there is none."""
    for dataset in stats.datasets:
        if dataset.name == name:
            return dataset
    return None


def _check_name(feature: str) -> str:
    """The check a compared feature belongs to: class_cnn -> class_mix:cnn."""
    if feature == REVIEW_FEATURE:
        return REVIEW_CHECK
    for kind, check in (("class_", "class_mix:"), ("confidence_", "confidence:")):
        if feature.startswith(kind):
            return check + feature[len(kind):]
    return feature


def drift_schema(features: Mapping[str, bool], config: MonitorConfig) -> schema_pb2.Schema:
    """Each feature ({name: categorical}) with a drift comparator at its check's threshold."""
    thresholds = {name: getattr(config, field) for name, (_, field) in IMAGE_FEATURES.items()}
    schema = schema_pb2.Schema()
    for name, categorical in sorted(features.items()):
        feature = schema.feature.add(name=name, type=schema_pb2.BYTES if categorical
                                     else schema_pb2.FLOAT)
        if name in thresholds:
            threshold = thresholds[name]
        elif name == REVIEW_FEATURE:
            threshold = config.review_rate_linf
        elif name.startswith("class_"):
            threshold = config.class_mix_linf
        else:
            threshold = config.confidence_js
        if categorical:
            feature.drift_comparator.infinity_norm.threshold = threshold
        else:
            feature.drift_comparator.jensen_shannon_divergence.threshold = threshold
    return schema


def drift_checks(current: statistics_pb2.DatasetFeatureStatistics,
                 previous: statistics_pb2.DatasetFeatureStatistics,
                 primary: Mapping[str, int], combo: Optional[str], config: MonitorConfig,
                 judged: bool) -> dict[str, dict[str, Any]]:
    """Check name -> {distance, threshold, alert}: window `current` against `previous`."""
    names = {name: name for name in IMAGE_FEATURES}
    names.update(answer_names(current, primary, combo))
    previous_names = answer_names(previous, primary, combo)
    names = {k: v for k, v in names.items() if k in IMAGE_FEATURES or k in previous_names}
    categorical = {new: new in CATEGORICAL_FEATURES or new == REVIEW_FEATURE
                   or new.startswith("class_") for new in names.values()}
    anomalies = tfdv.validate_statistics(
        served_subset(current, names), drift_schema(categorical, config),
        previous_statistics=served_subset(previous, names))
    found = {}
    for info in anomalies.drift_skew_info:
        for measurement in info.drift_measurements:
            distance, threshold = float(measurement.value), float(measurement.threshold)
            found[_check_name(info.path.step[0])] = {
                "distance": distance, "threshold": threshold,
                "alert": bool(judged and distance > threshold)}
    return dict(sorted(found.items()))


def window_checks(collected: Collected, primary: Mapping[str, int], combo: Optional[str],
                  ref: LoadedReference, config: MonitorConfig) -> list[dict[str, Any]]:
    """The same numbers per time window (no pixel histogram), and each window's drift
    from the one before it (none for the first)."""
    windows: list[dict[str, Any]] = []
    previous: Optional[tuple[statistics_pb2.DatasetFeatureStatistics, int]] = None
    for label in collected.windows():
        dataset = slice_of(collected.stats, window_slice(label))
        faces = collected.counts.get(("faces", label), 0)
        if dataset is None or not faces:
            continue
        judged = faces >= config.min_requests
        checks, _ = compare(dataset, None, primary, combo, ref, config, judged)
        drift = (drift_checks(dataset, previous[0], primary, combo, config,
                              judged and previous[1] >= config.min_requests)
                 if previous is not None else {})
        start = int(label)
        windows.append({"start": iso_time(start),
                        "end": iso_time(start + collected.window_width), "faces": faces,
                        **summary_from_counts(collected.counts, label, primary, combo,
                                              CONFIDENCE_UNIT),
                        "distances": {c["name"]: c["distance"] for c in checks},
                        "alerts": [c["name"] for c in checks if c["alert"]],
                        "drift": {name: d["distance"] for name, d in drift.items()},
                        "drift_alerts": [name for name, d in drift.items() if d["alert"]]})
        previous = (dataset, faces)
    return windows
