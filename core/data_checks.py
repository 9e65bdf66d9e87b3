"""The data checks the statistics page and the ExampleValidator share: the checked-in schema
with the label-drift threshold from the config, each split's statistics, the label
distributions and their L-infinity distance to the training split, and how anomalies are
described to a person.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import CLASS_NAMES, FEATURE_LABEL, SPLITS, STATISTICS_FILE
from fer_pipeline.core.errors import MissingInputError

__all__ = ["BASELINE_SPLIT", "OVERRIDE_FLAG", "DriftResult", "describe_anomalies", "drift_record",
           "format_distance", "label_distribution", "linf_distance", "load_schema",
           "load_split_statistics", "measure_label_drift", "observed_summary", "summarize"]

BASELINE_SPLIT = "train"           # drift is measured against the training split
OVERRIDE_FLAG = "--allow-anomalies"


@dataclass
class DriftResult:
    split: str
    baseline: str
    linf: Optional[float]              # our own computation; None when labels are missing
    tfdv_linf: Optional[float]         # what TFDV's drift comparator measured, if it ran
    threshold: float
    drifted: bool
    distribution: dict[str, float] = field(default_factory=dict)



def load_schema(schema_path: str, label_linf_threshold: float) -> schema_pb2.Schema:
    """The checked-in schema with the label drift threshold taken from the config."""
    fileio.register_filesystem(schema_path)
    schema = tfdv.load_schema_text(schema_path)
    label = tfdv.get_feature(schema, FEATURE_LABEL)
    label.drift_comparator.infinity_norm.threshold = label_linf_threshold
    return schema


def load_split_statistics(
        statistics_dir: str) -> dict[str, statistics_pb2.DatasetFeatureStatisticsList]:
    """Known splits first, in pipeline order, then any other split directory."""
    found = {fileio.basename(fileio.dirname(path))
             for path in fileio.glob(fileio.join(statistics_dir, "*", STATISTICS_FILE))}
    if not found:
        raise MissingInputError(f"no <split>/{STATISTICS_FILE} under {statistics_dir}")
    ordered = [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))
    return {split: tfdv.load_statistics(fileio.join(statistics_dir, split, STATISTICS_FILE))
            for split in ordered}


def label_distribution(
        stats: statistics_pb2.DatasetFeatureStatisticsList) -> Optional[dict[str, float]]:
    """Fraction of examples per label value, from the categorical statistics of `emotion`.

    None when the split has no label statistics (the feature is missing) or they are not
    categorical (statistics computed without fer_pipeline.components.statistics.executor' schema hint).
    """
    dataset = stats.datasets[0]
    for feature in dataset.features:
        if tuple(feature.path.step) == (FEATURE_LABEL,) or feature.name == FEATURE_LABEL:
            buckets = feature.string_stats.rank_histogram.buckets
            total = sum(b.sample_count for b in buckets)
            if not total:
                return None
            return {b.label: b.sample_count / total for b in buckets}
    return None


def linf_distance(p: dict[str, float], q: dict[str, float]) -> float:
    """max over label values of |p - q|, a value absent on one side counting as 0."""
    return max(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def measure_label_drift(split: str, stats: statistics_pb2.DatasetFeatureStatisticsList,
                        baseline: statistics_pb2.DatasetFeatureStatisticsList,
                        anomalies: anomalies_pb2.Anomalies,
                        threshold: float) -> DriftResult:
    current, previous = label_distribution(stats), label_distribution(baseline)
    linf = (round(linf_distance(current, previous), 6)
            if current is not None and previous is not None else None)
    tfdv_linf = _tfdv_linf(anomalies)
    # TFDV flags drift strictly above the threshold; agree with it.
    drifted = any(value is not None and value > threshold for value in (linf, tfdv_linf))
    return DriftResult(split=split, baseline=BASELINE_SPLIT, linf=linf, tfdv_linf=tfdv_linf,
                       threshold=threshold, drifted=drifted, distribution=current or {})


def _tfdv_linf(anomalies: anomalies_pb2.Anomalies) -> Optional[float]:
    for info in anomalies.drift_skew_info:
        if tuple(info.path.step) == (FEATURE_LABEL,):
            for measurement in info.drift_measurements:
                if measurement.type == anomalies_pb2.DriftSkewInfo.Measurement.L_INFTY:
                    return round(measurement.value, 6)
    return None


def describe_anomalies(anomalies: anomalies_pb2.Anomalies,
                       stats: statistics_pb2.DatasetFeatureStatisticsList) -> dict[str, str]:
    """feature -> TFDV's description plus what the statistics observed.

    TFDV says "Some examples have fewer values than expected" but not how many they had;
    the observed counts and range make the anomaly actionable without opening the stats.
    """
    described = {}
    for feature, info in sorted(anomalies.anomaly_info.items()):
        observed = observed_summary(stats, feature)
        described[feature] = (info.description or info.short_description) + (
            f" (observed: {observed})" if observed else "")
    return described


def observed_summary(stats: statistics_pb2.DatasetFeatureStatisticsList,
                     feature_name: str) -> str:
    """e.g. "values per example 2000..2304; range 0..255; missing in 0 of 70 examples"."""
    dataset = stats.datasets[0]
    for feature in dataset.features:
        if ".".join(feature.path.step) != feature_name and feature.name != feature_name:
            continue
        which = feature.WhichOneof("stats")
        if which is None:
            return ""
        common = getattr(feature, which).common_stats
        parts = [f"values per example {common.min_num_values}..{common.max_num_values}"]
        if which == "num_stats":
            parts.append(f"range {feature.num_stats.min:g}..{feature.num_stats.max:g}")
        elif which == "string_stats":
            top = sorted((b.label for b in feature.string_stats.rank_histogram.buckets),
                         key=_label_order)[:20]
            parts.append(f"values {', '.join(map(repr, top))}")
        parts.append(f"missing in {common.num_missing} of {dataset.num_examples} examples")
        return "; ".join(parts)
    return f"absent from all {dataset.num_examples} examples"


def drift_record(stats: dict[str, statistics_pb2.DatasetFeatureStatisticsList],
                 drift: dict[str, DriftResult], threshold: float) -> dict:
    return {
        "feature": FEATURE_LABEL,
        "metric": "L-infinity distance between label distributions",
        "threshold": threshold,
        "baseline": BASELINE_SPLIT,
        "distributions": {split: _named_classes(label_distribution(s) or {})
                          for split, s in stats.items()},
        "comparisons": {split: {"baseline": d.baseline, "linf": d.linf,
                                "tfdv_linf": d.tfdv_linf, "drifted": d.drifted}
                        for split, d in drift.items()},
    }


def _named_classes(distribution: dict[str, float]) -> dict[str, float]:
    """Label values as "3 happy" so the JSON reads without a class table."""
    def name(value: str) -> str:
        known = value.isdigit() and int(value) < len(CLASS_NAMES)
        return f"{value} {CLASS_NAMES[int(value)]}" if known else value
    return {name(k): round(v, 6) for k, v in sorted(distribution.items(),
                                                    key=lambda kv: _label_order(kv[0]))}


def _label_order(value: str) -> tuple[int, str]:
    return (int(value), "") if value.lstrip("-").isdigit() else (1 << 30, value)


def summarize(anomalies: dict[str, dict[str, str]], drift: dict[str, DriftResult],
              problems: bool, blocking: bool) -> str:
    parts = [f"{split}: anomalies in {', '.join(found)}"
             for split, found in anomalies.items() if found]
    parts += [f"{d.split}: label drift L-inf {format_distance(d.linf)} > {d.threshold} vs {d.baseline}"
              for d in drift.values() if d.drifted]
    if not problems:
        return "no anomalies, no label drift"
    verdict = "BLOCKING" if blocking else f"allowed by {OVERRIDE_FLAG}"
    return f"{verdict}: " + "; ".join(parts)


def format_distance(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"
