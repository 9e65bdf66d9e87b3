"""ExampleValidator: checks each split's statistics against the curated schema, and the
label distribution of validation/test against train.

Reads `<statistics_dir>/<split>/stats.tfrecord` (components/statistics/executor.py) and the schema
(schemas/fer2013/schema.pbtxt). Writes under `output_dir`:
  <split>.anomalies.pbtxt  TFDV's Anomalies proto, text format
  drift.json               label distributions and their L-infinity distances to train
  report.txt               the same, for a person to read

`run_validation` never raises because of what it finds: the runner records the step (so
the report is on disk and in the manifest) and then calls `raise_if_blocking`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.config import ValidationConfig
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_LABEL, SPLITS, STATISTICS_FILE, DRIFT_FILE,
    VALIDATION_REPORT)

log = logging.getLogger(__name__)

BASELINE_SPLIT = "train"           # drift is measured against the training split
OVERRIDE_FLAG = "--allow-anomalies"


class DataValidationError(RuntimeError):
    """The data broke the schema or drifted, and anomalies were not allowed."""


@dataclass
class DriftResult:
    split: str
    baseline: str
    linf: Optional[float]              # our own computation; None when labels are missing
    tfdv_linf: Optional[float]         # what TFDV's drift comparator measured, if it ran
    threshold: float
    drifted: bool
    distribution: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationResult:
    splits: list[str]
    num_examples: dict[str, int]
    anomalies: dict[str, dict[str, str]]   # split -> feature -> description
    drift: dict[str, DriftResult]          # split -> its label drift vs train
    blocking: bool
    report_path: str
    drift_path: str
    anomalies_paths: dict[str, str]
    summary: str


def run_validation(statistics_dir: str, schema_path: str, output_dir: str,
                   config: ValidationConfig) -> ValidationResult:
    """Validates every split's statistics; see the module docstring for the outputs."""
    fileio.makedirs(output_dir)
    fileio.register_filesystem(output_dir)  # TFDV writes the anomalies with tf.io.gfile
    schema = load_schema(schema_path, config.label_linf_threshold)
    stats = load_split_statistics(statistics_dir)
    baseline = stats.get(BASELINE_SPLIT)

    anomalies_protos: dict[str, anomalies_pb2.Anomalies] = {}
    anomalies_paths: dict[str, str] = {}
    drift: dict[str, DriftResult] = {}
    for split, split_stats in stats.items():
        previous = baseline if split != BASELINE_SPLIT else None
        anomalies = tfdv.validate_statistics(split_stats, schema,
                                             previous_statistics=previous)
        anomalies_protos[split] = anomalies
        anomalies_paths[split] = fileio.join(output_dir, f"{split}.anomalies.pbtxt")
        tfdv.write_anomalies_text(anomalies, anomalies_paths[split])
        if previous is not None:
            drift[split] = measure_label_drift(split, split_stats, previous, anomalies,
                                               config.label_linf_threshold)

    anomalies = {split: describe_anomalies(a, stats[split])
                 for split, a in anomalies_protos.items()}
    num_examples = {split: int(s.datasets[0].num_examples) for split, s in stats.items()}
    problems = any(anomalies.values()) or any(d.drifted for d in drift.values())
    blocking = problems and not config.allow_anomalies

    drift_path = fileio.join(output_dir, DRIFT_FILE)
    fileio.write_json(drift_path, drift_record(stats, drift, config.label_linf_threshold))
    summary = summarize(anomalies, drift, problems, blocking)
    report_path = fileio.join(output_dir, VALIDATION_REPORT)
    observed = {split: {feature: observed_summary(stats[split], feature)
                        for feature in a.anomaly_info}
                for split, a in anomalies_protos.items()}
    fileio.write_text(report_path, render_report(
        schema_path, config, num_examples, anomalies_protos, drift, summary, observed))
    log.info("data validation: %s", summary)
    return ValidationResult(
        splits=list(stats), num_examples=num_examples, anomalies=anomalies, drift=drift,
        blocking=blocking, report_path=report_path, drift_path=drift_path,
        anomalies_paths=anomalies_paths, summary=summary)


def raise_if_blocking(result: ValidationResult) -> None:
    """Raises DataValidationError quoting the report when the run must stop."""
    if not result.blocking:
        return
    report = fileio.read_text(result.report_path)
    raise DataValidationError(
        f"data validation failed: {result.summary}\n"
        f"Full report: {result.report_path}\n\n{report}\n"
        f"If these anomalies are expected (for example a deliberately different split), "
        f"re-run with {OVERRIDE_FLAG} (ValidationConfig.allow_anomalies: true) to continue; "
        f"they stay in the report. Otherwise fix the data, or the schema at "
        f"{ValidationConfig.schema_path} after review.")


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
        raise FileNotFoundError(f"no <split>/{STATISTICS_FILE} under {statistics_dir}")
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
    parts += [f"{d.split}: label drift L-inf {_fmt(d.linf)} > {d.threshold} vs {d.baseline}"
              for d in drift.values() if d.drifted]
    if not problems:
        return "no anomalies, no label drift"
    verdict = "BLOCKING" if blocking else f"allowed by {OVERRIDE_FLAG}"
    return f"{verdict}: " + "; ".join(parts)


def render_report(schema_path: str, config: ValidationConfig, num_examples: dict[str, int],
                  anomalies: dict[str, anomalies_pb2.Anomalies],
                  drift: dict[str, DriftResult], summary: str,
                  observed: dict[str, dict[str, str]]) -> str:
    """`observed`: split -> feature -> observed_summary, for the anomalous features."""
    lines = ["FER-2013 data validation report", "",
             f"schema: {schema_path}",
             f"label drift threshold (L-infinity vs {BASELINE_SPLIT}): "
             f"{config.label_linf_threshold}",
             f"allow_anomalies: {config.allow_anomalies}",
             f"result: {summary}", ""]
    for split, split_anomalies in anomalies.items():
        lines += _split_section(split, num_examples[split], split_anomalies,
                                observed[split])
    lines += _drift_section(drift, config.label_linf_threshold)
    return "\n".join(lines) + "\n"


def _split_section(split: str, count: int, anomalies: anomalies_pb2.Anomalies,
                   observed: dict[str, str]) -> list[str]:
    infos = sorted(anomalies.anomaly_info.items())
    if not infos:
        return [f"[{split}] {count} examples: no anomalies", ""]
    lines = [f"[{split}] {count} examples: {len(infos)} feature(s) with anomalies"]
    for feature, info in infos:
        reasons = info.reason or [info]
        for reason in reasons:
            lines.append(f"  - {feature}: {reason.short_description}: {reason.description}")
        if observed.get(feature):
            lines.append(f"      observed: {observed[feature]}")
    return lines + [""]


def _drift_section(drift: dict[str, DriftResult], threshold: float) -> list[str]:
    if not drift:
        return [f"label drift: not measured (no {BASELINE_SPLIT} split, or it is the only one)"]
    lines = [f"label drift on {FEATURE_LABEL} (L-infinity distance to {BASELINE_SPLIT}, "
             f"threshold {threshold}):"]
    for d in drift.values():
        status = "DRIFT" if d.drifted else "ok"
        lines.append(f"  {d.split:<12} {_fmt(d.linf):>8}  (TFDV: {_fmt(d.tfdv_linf)})  {status}")
    return lines


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"
