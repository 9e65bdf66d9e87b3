"""Monitoring as a job (`fer-pipeline monitor`, and its Kubeflow component).

Like bulk inference it is not a step of the training DAG: it reads what the server logged
after a push, so it runs on a schedule, not with the pipeline. It finds the request logs
(the files or directories given, or every model's `logging_config` prefix in the serving
root's models.config), asks ML Metadata which training run produced each version the logs
name (pipeline/lineage.py: the pushed version's train split, its statistics and the
evaluation that blessed it), runs `components/monitor/executor.py` into its output directory and
records the execution the way the runner records a step: the log files and the pushed
model versions it judged (the same `pushed_model` artifacts the push step recorded) as
inputs, monitoring.json as output.
"""
from __future__ import annotations

import os
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Sequence

from fer_pipeline.components.monitor import MonitorResult, run_monitor
from fer_pipeline.components.monitor.reference import MonitorReference
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import fingerprint
from fer_pipeline.core.config import MetadataConfig, PipelineConfig
from fer_pipeline.core.contract import MODELS_CONFIG, MONITORING_FILE
from fer_pipeline.core.errors import ConfigError, InputDataError, MissingInputError
from fer_pipeline.pipeline.lineage import version_lineage
from fer_pipeline.pipeline.metadata import ArtifactRecord, MetadataStore, sqlite_path
from fer_pipeline.pipeline.runner import schema_path
from fer_pipeline.core.serving_root import read_model_server_config
from fer_pipeline.serving.request_log import log_files

MONITOR_STEP = "monitor"   # the execution type in ML Metadata: fer.step.monitor
MONITORING_DIR = "monitoring"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_moment(text: str, now: Optional[datetime] = None) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise), or a duration ago: `2h`, `30m`, `1d`."""
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not a time: use ISO 8601 (2026-11-30T07:00:00Z) or a "
                          "duration ago (30m, 2h, 1d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def configured_log_dirs(serving_root: str) -> list[str]:
    """The directories models.config tells fer-serve to log each model's requests to."""
    config_path = fileio.join(serving_root, MODELS_CONFIG)
    if not fileio.exists(config_path):
        raise MissingInputError(f"no {MODELS_CONFIG} under {serving_root}: name the request logs "
                                "with --logs")
    dirs = sorted({os.path.dirname(spec.request_log.filename_prefix) or "."
                   for spec in read_model_server_config(config_path)
                   if spec.request_log is not None})
    if not dirs:
        raise ConfigError(f"{config_path} turns request logging on for no model (push with "
                          "--request-log-dir), and no --logs were given")
    return dirs


def lineage_reference(store: MetadataStore, logged: dict[str, int]) -> MonitorReference:
    """For each model version the logs name: the train split, its statistics and the
    evaluation of the run that pushed it. Versions with no recorded push are left out (the
    monitor reports them as ignored); the train split is that of the newest such push."""
    evaluations: dict[str, str] = {}
    versions: dict[str, int] = {}
    newest: Optional[dict[str, Any]] = None
    for model, version in sorted(logged.items()):
        pushed = [p for p in store.pushed_versions(model) if p["version"] == version]
        if not pushed:
            continue
        found = version_lineage(store, pushed[-1])
        evaluations[model] = found["evaluation"]["execution_dir"]
        versions[model] = version
        if newest is None or pushed[-1]["id"] > newest["pushed_id"]:
            newest = {"pushed_id": pushed[-1]["id"], **found}
    if newest is None:
        named = ", ".join(f"{m} v{v}" for m, v in sorted(logged.items()))
        raise InputDataError(f"the request logs name {named}, and {store.location} records no "
                             "push of any of them: monitor needs the run that pushed the served "
                             "version (--output RUN_ROOT or --metadata-db)")
    return MonitorReference(newest["ingest"]["execution_dir"],
                            newest["statistics"]["execution_dir"], evaluations, versions)


def default_output(run_root: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return fileio.join(run_root, MONITORING_DIR, stamp)


def run_monitor_job(run_root: str, logs: Sequence[str], output_dir: str,
                    config: PipelineConfig, since: Optional[datetime] = None,
                    until: Optional[datetime] = None, review_queue: Optional[str] = None,
                    metadata: Optional[MetadataConfig] = None,
                    serving_root: str = "", beam_args: Sequence[str] = ()) -> MonitorResult:
    """Finds the logs and the reference, judges the window into `output_dir` (a Beam job
    run with `beam_args`), and records the execution in ML Metadata (the run root's store
    unless `metadata` says otherwise)."""
    started = time.time()
    serving_root = serving_root or config.push.serving_root or fileio.join(
        run_root, "serving_models")
    paths = list(logs) or configured_log_dirs(serving_root)
    files = log_files(paths)
    if not files:
        raise MissingInputError(f"no request log files under {', '.join(paths)}")
    metadata = metadata or config.metadata
    store_path = sqlite_path(metadata, run_root)
    if not metadata.mysql_host and not os.path.exists(store_path):
        # Opening the store would create an empty one: say what is missing instead.
        raise MissingInputError(f"no ML Metadata store at {store_path}: monitor needs the run that "
                                "pushed the served versions (--output RUN_ROOT or --metadata-db)")
    store = MetadataStore(metadata, run_root)
    resolved: dict[str, MonitorReference] = {}

    def reference_for(logged: dict[str, int]) -> MonitorReference:
        resolved["reference"] = lineage_reference(store, logged)
        return resolved["reference"]

    result = run_monitor(files, reference_for, schema_path(config), output_dir, review_queue,
                         config.monitor, since=since, until=until, beam_args=beam_args)
    reference = resolved["reference"]
    inputs: dict[str, list[ArtifactRecord]] = {"request_logs": [
        ArtifactRecord("request_log", fileio.absolute(path), fingerprint(path))
        for path in files]}
    for model, version in sorted(reference.versions.items()):
        pushed = [p for p in store.pushed_versions(model) if p["version"] == version][-1]
        found = version_lineage(store, pushed)
        inputs[f"model_{model}"] = [ArtifactRecord(
            "pushed_model", pushed["uri"], found["fingerprint"] or "",
            {k: v for k, v in pushed.items() if k not in ("id", "uri")})]
    store.record_job(MONITOR_STEP, inputs, "monitoring",
                     fileio.join(output_dir, MONITORING_FILE), result, started, output_dir)
    return result
