"""Monitor: the served traffic of a window against the training run of the served versions.

Reads TF Serving request logs (`PredictionLog` TFRecords, serving/request_log.py writes
them), turns every logged Predict into faces and each model's answers, and compares them
with what the served versions were trained and evaluated on:

* the faces, with TFDV: statistics of the served faces (every pixel, and image features a
  person understands: mean brightness, contrast, the share of near-black and near-white
  pixels, a blur measure) are validated against the checked-in schema in its SERVING
  environment (no label at serving), and compared with the training split's statistics by
  each feature's `skew_comparator` (approximate Jensen-Shannon divergence);
* the answers, with TFDV too: each model's predicted-class shares (L-infinity) and
  confidence (Jensen-Shannon) against the same model's answers on the test split (the
  evaluation's `test_predictions.npz`), and the share of faces the ensemble sends to a
  person (the tie rule of core/ensemble.py, L-infinity on the review flag) against the
  review rate of the same models on the test split.

A distance above its threshold (core/config.py, MonitorConfig) is an alert. Outputs,
under `output_dir`: monitoring.json (every number), the TFDV anomalies (text protos) and
monitoring.html (components/monitor/page.py). With a review queue, the window's tied
faces and its lowest-confidence faces are queued for a person (serving/review_queue.py).

This module is the orchestration; each step lives in its own module of this package:
reading.py (the request logs), features.py (image features and their statistics),
reference.py (the training reference), answers.py (the models' answers), comparison.py
(distances, alerts, verdict), windows.py (per time window), review.py (faces for a person).

`run_monitor` takes the reference as directories (what lineage found: pipeline/monitor_command.py
resolves them for the CLI and the Kubeflow component); it never looks anything up itself.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2

from fer_pipeline.components.monitor.answers import Answers, served_answers, summary_numbers
from fer_pipeline.components.monitor.comparison import compare, verdict
from fer_pipeline.components.monitor.features import image_features
from fer_pipeline.components.monitor.reading import (Traffic, epoch_seconds, iso_time,
    read_traffic)
from fer_pipeline.components.monitor.reference import (LoadedReference, MonitorError,
    MonitorReference, load_reference)
from fer_pipeline.components.monitor.review import least_confident_faces, queue_for_review
from fer_pipeline.components.monitor.windows import window_checks
from fer_pipeline.core import fileio
from fer_pipeline.core.config import EvalConfig, MonitorConfig
from fer_pipeline.core.contract import MONITORING_FILE, MONITORING_HTML

__all__ = ["MonitorResult", "Assessment", "run_monitor", "assess", "logged_versions"]

log = logging.getLogger(__name__)

PAGE_FACES = 12                        # least confident faces shown on the page


@dataclass
class MonitorResult:
    """What one run of the monitor wrote and found."""
    monitoring_path: str
    html_path: str
    anomalies_paths: list[str]
    faces: int
    records: int
    alerts: list[str]
    verdict: str                       # "ok", "drift" or "too few requests"
    summary: str                       # one line for a person (the CLI prints it)
    review_queued: int = 0


@dataclass
class Assessment:
    """One window judged: every check, the verdict, and what the outputs are built from."""
    traffic: Traffic
    primary: dict[str, int]            # model -> the version judged
    answers: Answers
    rows: dict[str, np.ndarray]        # model -> its primary version's traffic rows
    paired_rows: np.ndarray            # rows of the faces the ensemble judged
    faces: int
    checks: list[dict[str, Any]]
    anomalies: dict[str, anomalies_pb2.Anomalies]
    alerts: list[str]
    verdict: str
    summary: str
    windows: list[dict[str, Any]]


def logged_versions(traffic: Traffic) -> dict[str, int]:
    """Per model in the traffic: the version that answered most of its faces."""
    found = {}
    for model in sorted(set(traffic.models)):
        versions, counts = np.unique(traffic.versions[traffic.models == model],
                                     return_counts=True)
        found[str(model)] = int(versions[counts.argmax()])
    return found


def _primary_versions(traffic: Traffic, reference: MonitorReference) -> dict[str, int]:
    """Per model with a reference: the version that answered most faces in the window
    (the reference describes that version; a push mid-window leaves the others counted)."""
    primary = {}
    for model in sorted(set(traffic.models)):
        if model not in reference.evaluations:
            continue
        versions, counts = np.unique(traffic.versions[traffic.models == model],
                                     return_counts=True)
        wanted = reference.versions.get(model)
        primary[model] = int(wanted if wanted in versions else versions[counts.argmax()])
    return primary


def _other_versions(traffic: Traffic, model: str, version: int) -> dict[str, int]:
    mask = (traffic.models == model) & (traffic.versions != version)
    versions, counts = np.unique(traffic.versions[mask], return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(versions, counts)}


def assess(traffic: Traffic, reference: MonitorReference, loaded: LoadedReference,
           config: MonitorConfig, tie_tolerance: float) -> Assessment:
    """Judges the traffic against the loaded reference: the checks, alerts and verdict."""
    primary = _primary_versions(traffic, reference)
    if not primary:
        raise MonitorError(f"the logs name {sorted(set(traffic.models))}, none of which has "
                           f"a reference (served models with lineage: "
                           f"{sorted(reference.evaluations)})")
    features = image_features(traffic.pixels, config)
    answers, rows, paired_rows = served_answers(traffic, primary, tie_tolerance)
    # Each face once: every model answered the same faces, so the image checks use the
    # rows of the model that answered most (a face sent twice by a user counts twice).
    face_rows = max(rows.values(), key=len)
    faces = int(len(face_rows))
    checks, anomalies = compare(face_rows, traffic, features, answers, loaded, config,
                                include_pixels=True, judged=faces >= config.min_requests)
    alerts = [c["name"] for c in checks if c["alert"]]
    judgement, summary = verdict(faces, alerts, checks, config)
    windows = window_checks(traffic, features, primary, face_rows, loaded, config,
                            tie_tolerance)
    return Assessment(traffic, primary, answers, rows, paired_rows, faces, checks, anomalies,
                      alerts, judgement, summary, windows)


def _write_anomalies(anomalies: Mapping[str, anomalies_pb2.Anomalies],
                     output_dir: str) -> list[str]:
    """Each TFDV anomalies proto as `<name>.anomalies.pbtxt`; returns the paths."""
    paths = []
    for name, proto in anomalies.items():
        path = fileio.join(output_dir, f"{name}.anomalies.pbtxt")
        tfdv.write_anomalies_text(proto, path)
        paths.append(path)
    return paths


def _monitoring_record(judged: Assessment, reference: MonitorReference,
                       loaded: LoadedReference, config: MonitorConfig, tie_tolerance: float,
                       since: Optional[datetime], until: Optional[datetime],
                       anomalies_paths: list[str], review_queue: Optional[str],
                       review: Optional[dict[str, int]]) -> dict[str, Any]:
    """monitoring.json's content (less the timings): every number the page shows."""
    traffic = judged.traffic
    known = traffic.timestamps[traffic.timestamps > 0]
    return {
        "verdict": judged.verdict, "summary": judged.summary, "alerts": judged.alerts,
        "window": {"since": iso_time(epoch_seconds(since)),
                   "until": iso_time(epoch_seconds(until)),
                   "first_request": iso_time(known.min()) if len(known) else None,
                   "last_request": iso_time(known.max()) if len(known) else None},
        "log_files": traffic.files, "records": traffic.records, "faces": judged.faces,
        "skipped": traffic.skipped,
        "served": {model: {"version": int(version), "faces": int(len(judged.rows[model])),
                           "other_versions": _other_versions(traffic, model, version)}
                   for model, version in judged.primary.items()},
        "ignored_models": sorted(set(traffic.models) - set(judged.primary)),
        "reference": {"examples_dir": reference.examples_dir,
                      "statistics_dir": reference.statistics_dir,
                      "evaluations": reference.evaluations,
                      "versions": reference.versions, "train_faces": loaded.train_faces,
                      "test_faces": loaded.test_faces},
        "checks": judged.checks,
        "traffic": summary_numbers(judged.answers),
        "expected": summary_numbers(loaded.answers),
        "windows": judged.windows,
        "thresholds": dataclasses.asdict(config),
        "tie_tolerance": tie_tolerance,
        "anomalies_files": anomalies_paths,
        "review_queue": ({"dir": review_queue, **review} if review is not None else None),
    }


def run_monitor(log_paths: Sequence[str],
                reference: Union[MonitorReference,
                                 Callable[[dict[str, int]], MonitorReference]],
                schema_path: str, output_dir: str, review_queue: Optional[str],
                config: MonitorConfig, *, since: Optional[datetime] = None,
                until: Optional[datetime] = None) -> MonitorResult:
    """Compares the logged traffic of [since, until) with the reference; see the module doc.

    `reference` is what the served versions came from, or a function that finds it given
    the versions the logs name ({model: the version that answered most}): the caller that
    looks it up in lineage (pipeline/monitor_command.py) only knows which versions to look up
    once the logs are read.
    """
    started = time.time()
    # Unset only when the config was built by hand rather than loaded (load_config fills in
    # evaluation's): the evaluation's default rule, then.
    tie_tolerance = (config.tie_tolerance if config.tie_tolerance is not None
                     else EvalConfig().tie_tolerance)
    timings: dict[str, float] = {}
    traffic = read_traffic(log_paths, since, until)
    timings["read_logs"] = time.time() - started
    if not len(traffic.pixels):
        raise MonitorError(f"no logged predictions in {len(traffic.files)} request log "
                           f"file(s) for the window [{iso_time(epoch_seconds(since)) or 'start'}, "
                           f"{iso_time(epoch_seconds(until)) or 'end'})")
    if callable(reference):
        reference = reference(logged_versions(traffic))
    models = list(_primary_versions(traffic, reference)) or list(reference.evaluations)
    mark = time.time()
    loaded = load_reference(reference, schema_path, config, tie_tolerance, models)
    timings["load_reference"] = time.time() - mark
    mark = time.time()
    judged = assess(traffic, reference, loaded, config, tie_tolerance)
    timings["judge"] = time.time() - mark
    mark = time.time()

    fileio.makedirs(output_dir)
    fileio.register_filesystem(output_dir)
    anomalies_paths = _write_anomalies(judged.anomalies, output_dir)
    review = (queue_for_review(review_queue, traffic, judged.answers, judged.rows,
                               judged.paired_rows, tie_tolerance,
                               config.review_lowest_confidence)
              if review_queue else None)
    record = _monitoring_record(judged, reference, loaded, config, tie_tolerance, since,
                                until, anomalies_paths, review_queue, review)
    # Rendering needs matplotlib; the checks above do not.
    from fer_pipeline.components.monitor.page import render_monitoring_page
    html_path = fileio.join(output_dir, MONITORING_HTML)
    fileio.write_text(html_path, render_monitoring_page(
        record, least_confident_faces(traffic, judged.rows, PAGE_FACES)))
    timings["write_outputs"] = time.time() - mark
    record["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    record["duration_s"] = round(time.time() - started, 3)
    monitoring_path = fileio.join(output_dir, MONITORING_FILE)
    fileio.write_json(monitoring_path, record)
    log.info("monitor: %s", judged.summary)
    return MonitorResult(monitoring_path, html_path, anomalies_paths, judged.faces,
                         traffic.records, judged.alerts, judged.verdict, judged.summary,
                         review["queued"] if review is not None else 0)
