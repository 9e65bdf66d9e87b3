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
from dataclasses import dataclass

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.config import ValidationConfig
from fer_pipeline.core.data_checks import (BASELINE_SPLIT, OVERRIDE_FLAG, DriftResult, describe_anomalies,
                                          drift_record, format_distance, load_schema,
                                          load_split_statistics, measure_label_drift,
                                          observed_summary, summarize)
from fer_pipeline.core.contract import DRIFT_FILE, FEATURE_LABEL, VALIDATION_REPORT
from fer_pipeline.core.errors import UserError

__all__ = ["run_validation", "ValidationResult", "DataValidationError", "raise_if_blocking"]

log = logging.getLogger(__name__)

class DataValidationError(UserError, RuntimeError):
    """The data broke the schema or drifted, and anomalies were not allowed."""


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
        lines.append(f"  {d.split:<12} {format_distance(d.linf):>8}  (TFDV: {format_distance(d.tfdv_linf)})  {status}")
    return lines
