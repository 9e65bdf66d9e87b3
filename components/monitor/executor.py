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

The served side is computed by a Beam job (job.py; its flags are the data steps': the
DirectRunner in-process or multi-processing, Flink, Spark): the logs are read, decoded,
joined by request id and measured in the workers, and only statistics, sums and bounded
samples come back, so the driver's memory does not grow with the window. Records that
cannot be decoded or break the serving schema are counted per reason, and their share is
a check of its own (monitor.max_bad_share). Each time window is also compared with the
one before it (windows.py).

This module is the orchestration; each step lives in its own module of this package:
reading.py (decoding one logged record), join.py (the answers of one request), job.py
(the Beam job), features.py (image features), reference.py (the training reference),
answers.py (the models' answers), comparison.py (distances, alerts, verdict), windows.py
(per time window, and drift between windows), review.py (faces for a person).

`run_monitor` takes the reference as directories (what lineage found: pipeline/monitor_command.py
resolves them for the CLI and the Kubeflow component); it never looks anything up itself.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2

from fer_pipeline.components.monitor.answers import summary_from_counts, summary_numbers
from fer_pipeline.components.monitor.comparison import bad_records_check, compare, verdict
from fer_pipeline.components.monitor.job import (ALL, CONFIDENCE_UNIT, Collected, collect,
    combination)
from fer_pipeline.components.monitor.reading import epoch_seconds, iso_time
from fer_pipeline.components.monitor.reference import (LoadedReference, MonitorError,
    MonitorReference, load_reference)
from fer_pipeline.components.monitor.review import least_confident_faces, queue_for_review
from fer_pipeline.components.monitor.windows import WHOLE_WINDOW, slice_of, window_checks
from fer_pipeline.core import fileio
from fer_pipeline.core.config import EvalConfig, MonitorConfig
from fer_pipeline.core.contract import MONITORING_FILE, MONITORING_HTML
from fer_pipeline.serving.request_log import log_files

__all__ = ["MonitorResult", "Assessment", "run_monitor", "collect_traffic", "assess",
           "logged_versions"]

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
    traffic: Collected
    primary: dict[str, int]            # model -> the version judged
    combo: Optional[str]               # the served versions together (review rate)
    faces: int
    checks: list[dict[str, Any]]
    anomalies: dict[str, anomalies_pb2.Anomalies]
    alerts: list[str]
    verdict: str
    summary: str
    windows: list[dict[str, Any]]


def _tie_tolerance(config: MonitorConfig) -> float:
    # Unset only when the config was built by hand rather than loaded (load_config fills in
    # evaluation's): the evaluation's default rule, then.
    return (config.tie_tolerance if config.tie_tolerance is not None
            else EvalConfig().tie_tolerance)


def collect_traffic(log_paths: Sequence[str], scratch: str, config: MonitorConfig,
                    since: Optional[datetime] = None, until: Optional[datetime] = None,
                    beam_args: Sequence[str] = ()) -> Collected:
    """Runs the Beam job over the logs of [since, until); `scratch`: its working directory
    (removed afterwards)."""
    try:
        return collect(log_files(list(log_paths)), scratch, config, _tie_tolerance(config),
                       epoch_seconds(since), epoch_seconds(until), beam_args,
                       max(PAGE_FACES, config.review_lowest_confidence))
    finally:
        if fileio.exists(scratch):
            fileio.rmtree(scratch)


def logged_versions(traffic: Collected) -> dict[str, int]:
    """Per model in the traffic: the version that answered most of its faces (the lowest
    of those that answered equally many)."""
    found: dict[str, tuple[int, int]] = {}
    for (model, version), count in sorted(traffic.served().items()):
        if model not in found or count > found[model][1]:
            found[model] = (version, count)
    return {model: version for model, (version, _) in sorted(found.items())}


def _primary_versions(traffic: Collected, reference: MonitorReference) -> dict[str, int]:
    """Per model with a reference: the reference's version if it answered in the window,
    else the version that answered most (a push mid-window leaves the others counted)."""
    served = traffic.served()
    most = logged_versions(traffic)
    return {model: (reference.versions[model] if (model, reference.versions.get(model))
                    in served else version)
            for model, version in most.items() if model in reference.evaluations}


def _other_versions(traffic: Collected, model: str, version: int) -> dict[str, int]:
    return {str(v): n for (m, v), n in sorted(traffic.served().items())
            if m == model and v != version}


def assess(traffic: Collected, reference: MonitorReference, loaded: LoadedReference,
           config: MonitorConfig) -> Assessment:
    """Judges the collected traffic against the loaded reference: checks, alerts, verdict."""
    primary = _primary_versions(traffic, reference)
    if not primary:
        raise MonitorError(f"the logs name {sorted({m for m, _ in traffic.served()})}, none "
                           f"of which has a reference (served models with lineage: "
                           f"{sorted(reference.evaluations)})")
    combo = combination(primary.items()) if len(primary) > 1 else None
    faces = traffic.counts.get(("faces", ALL), 0)
    whole = slice_of(traffic.stats, WHOLE_WINDOW)
    checks, anomalies = compare(whole, traffic.pixel_stats, primary, combo, loaded, config,
                                judged=faces >= config.min_requests)
    checks.append(bad_records_check(traffic.records, traffic.reasons("bad"), config))
    alerts = [c["name"] for c in checks if c["alert"]]
    judgement, summary = verdict(faces, alerts, checks, config)
    windows = window_checks(traffic, primary, combo, loaded, config)
    return Assessment(traffic, primary, combo, faces, checks, anomalies, alerts, judgement,
                      summary, windows)


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
    first, last = traffic.stamps
    return {
        "verdict": judged.verdict, "summary": judged.summary, "alerts": judged.alerts,
        "window": {"since": iso_time(epoch_seconds(since)),
                   "until": iso_time(epoch_seconds(until)),
                   "first_request": iso_time(first), "last_request": iso_time(last)},
        "log_files": traffic.files, "records": traffic.records, "faces": judged.faces,
        "skipped": traffic.reasons("skipped"), "bad_records": traffic.reasons("bad"),
        "served": {model: {"version": int(version),
                           "faces": traffic.served()[(model, version)],
                           "other_versions": _other_versions(traffic, model, version)}
                   for model, version in judged.primary.items()},
        "ignored_models": sorted({m for m, _ in traffic.served()} - set(judged.primary)),
        "reference": {"examples_dir": reference.examples_dir,
                      "statistics_dir": reference.statistics_dir,
                      "evaluations": reference.evaluations,
                      "versions": reference.versions, "train_faces": loaded.train_faces,
                      "test_faces": loaded.test_faces},
        "checks": judged.checks,
        "traffic": summary_from_counts(traffic.counts, ALL, judged.primary, judged.combo,
                                       CONFIDENCE_UNIT),
        "expected": summary_numbers(loaded.answers),
        "windows": judged.windows,
        "thresholds": dataclasses.asdict(config),
        "tie_tolerance": tie_tolerance,
        "anomalies_files": anomalies_paths,
        "review_queue": ({"dir": review_queue, **review} if review is not None else None),
        "job": {"partitions": traffic.partitions, **traffic.extra},
    }


def run_monitor(log_paths: Sequence[str],
                reference: Union[MonitorReference,
                                 Callable[[dict[str, int]], MonitorReference]],
                schema_path: str, output_dir: str, review_queue: Optional[str],
                config: MonitorConfig, *, since: Optional[datetime] = None,
                until: Optional[datetime] = None,
                beam_args: Sequence[str] = ()) -> MonitorResult:
    """Compares the logged traffic of [since, until) with the reference; see the module doc.

    `reference` is what the served versions came from, or a function that finds it given
    the versions the logs name ({model: the version that answered most}): the caller that
    looks it up in lineage (pipeline/monitor_command.py) only knows which versions to look up
    once the logs are read. `beam_args`: the Beam flags the job runs with.
    """
    started = time.time()
    tie_tolerance = _tie_tolerance(config)
    timings: dict[str, float] = {}
    fileio.makedirs(output_dir)
    fileio.register_filesystem(output_dir)
    traffic = collect_traffic(log_paths, fileio.join(output_dir, f".job-{uuid.uuid4().hex}"),
                              config, since, until, beam_args)
    timings["beam_job"] = time.time() - started
    if not traffic.counts.get(("faces", ALL)):
        bad = "; ".join(f"{k}: {v}" for k, v in traffic.reasons("bad").items())
        raise MonitorError(f"no logged predictions in {len(traffic.files)} request log "
                           f"file(s) for the window [{iso_time(epoch_seconds(since)) or 'start'}, "
                           f"{iso_time(epoch_seconds(until)) or 'end'})"
                           + (f" ({traffic.records} records, unusable: {bad})" if bad else ""))
    if callable(reference):
        reference = reference(logged_versions(traffic))
    models = list(_primary_versions(traffic, reference)) or list(reference.evaluations)
    mark = time.time()
    loaded = load_reference(reference, schema_path, config, tie_tolerance, models)
    timings["load_reference"] = time.time() - mark
    mark = time.time()
    judged = assess(traffic, reference, loaded, config)
    timings["judge"] = time.time() - mark
    mark = time.time()

    anomalies_paths = _write_anomalies(judged.anomalies, output_dir)
    review = (queue_for_review(review_queue, traffic.ties, traffic.lowest, judged.primary,
                               tie_tolerance, config.review_lowest_confidence)
              if review_queue else None)
    record = _monitoring_record(judged, reference, loaded, config, tie_tolerance, since,
                                until, anomalies_paths, review_queue, review)
    # Rendering needs matplotlib; the checks above do not.
    from fer_pipeline.components.monitor.page import render_monitoring_page
    html_path = fileio.join(output_dir, MONITORING_HTML)
    fileio.write_text(html_path, render_monitoring_page(
        record, least_confident_faces(traffic.lowest, judged.primary, PAGE_FACES)))
    timings["write_outputs"] = time.time() - mark
    record["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    record["duration_s"] = round(time.time() - started, 3)
    monitoring_path = fileio.join(output_dir, MONITORING_FILE)
    fileio.write_json(monitoring_path, record)
    log.info("monitor: %s", judged.summary)
    return MonitorResult(monitoring_path, html_path, anomalies_paths, judged.faces,
                         traffic.records, judged.alerts, judged.verdict, judged.summary,
                         review["queued"] if review is not None else 0)
