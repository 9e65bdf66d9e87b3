"""Comparing a window with the reference: TFDV's distances, the alerts, the verdict.

Faces are compared with the train split (image features, pixel histogram, the schema's
SERVING environment), answers with the test split (class mix, confidence, review rate);
the served side is the Beam job's statistics (job.py), one slice of them per window.
Records that cannot be decoded or break the serving schema are a check of their own.
Every distance is TFDV's own skew comparator measurement; one above its threshold is an
alert, unless the window has too few faces to be judged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2

from fer_pipeline.components.monitor.answers import REVIEW_FEATURE
from fer_pipeline.components.monitor.features import (CATEGORICAL_FEATURES, IMAGE_FEATURES,
    feature_stats)
from fer_pipeline.components.monitor.job import answer_feature, review_feature
from fer_pipeline.components.monitor.reference import SERVING_ENVIRONMENT, LoadedReference
from fer_pipeline.core.config import MonitorConfig
from fer_pipeline.core.contract import FEATURE_PIXELS

__all__ = ["PIXELS_CHECK", "SCHEMA_CHECK", "REVIEW_CHECK", "BAD_CHECK", "answers_schema",
           "served_subset", "answer_names", "compare", "bad_records_check", "verdict"]

PIXELS_CHECK = "pixels"
BAD_CHECK = "bad_records"
SCHEMA_CHECK = "schema"
REVIEW_CHECK = "review_rate"

Checks = list[dict[str, Any]]


def answers_schema(models: Sequence[str], with_review: bool,
                   config: MonitorConfig) -> schema_pb2.Schema:
    """The answers' features, each with its skew comparator threshold from the config."""
    schema = schema_pb2.Schema()
    for model in models:
        classes = schema.feature.add(name=f"class_{model}", type=schema_pb2.BYTES)
        classes.skew_comparator.infinity_norm.threshold = config.class_mix_linf
        confidence = schema.feature.add(name=f"confidence_{model}", type=schema_pb2.FLOAT)
        confidence.skew_comparator.jensen_shannon_divergence.threshold = config.confidence_js
    if with_review:
        review = schema.feature.add(name=REVIEW_FEATURE, type=schema_pb2.BYTES)
        review.skew_comparator.infinity_norm.threshold = config.review_rate_linf
    return schema


def _skew(reference: statistics_pb2.DatasetFeatureStatisticsList,
          served: statistics_pb2.DatasetFeatureStatisticsList,
          schema: schema_pb2.Schema, environment: Optional[str] = None
          ) -> tuple[dict[str, tuple[float, float]], anomalies_pb2.Anomalies]:
    """feature -> (distance, threshold) from TFDV's skew comparators, and the anomalies."""
    anomalies = tfdv.validate_statistics(reference, schema, environment=environment,
                                         serving_statistics=served)
    measured = {}
    for info in anomalies.drift_skew_info:
        for measurement in info.skew_measurements:
            measured[info.path.step[0]] = (float(measurement.value),
                                           float(measurement.threshold))
    return measured, anomalies


def _check(name: str, kind: str, measure: str, distance: Optional[float], threshold: float,
           judged: bool, description: str) -> dict[str, Any]:
    return {"name": name, "kind": kind, "measure": measure, "distance": distance,
            "threshold": threshold, "description": description,
            "alert": bool(judged and distance is not None and distance > threshold)}


def served_subset(dataset: statistics_pb2.DatasetFeatureStatistics,
                  names: Mapping[str, str]) -> statistics_pb2.DatasetFeatureStatisticsList:
    """The statistics of the features `names` ({name in the job's statistics: name to
    compare under}) of one dataset (a window's slice), renamed."""
    subset = statistics_pb2.DatasetFeatureStatisticsList()
    out = subset.datasets.add(num_examples=dataset.num_examples)
    for feature in dataset.features:
        name = feature.path.step[0] if feature.path.step else feature.name
        if name in names:
            copy = out.features.add()
            copy.CopyFrom(feature)
            copy.ClearField("name")
            copy.path.ClearField("step")
            copy.path.step.append(names[name])
    return subset


def _served_face_statistics(faces: statistics_pb2.DatasetFeatureStatistics,
                            pixels: Optional[statistics_pb2.DatasetFeatureStatisticsList]
                            ) -> statistics_pb2.DatasetFeatureStatisticsList:
    """The window's image-feature statistics, with its pixel histogram if given (from a
    sample when the window is large, beside the features, which use every face)."""
    served = served_subset(faces, {name: name for name in IMAGE_FEATURES})
    if pixels is not None:
        pixel_feature = feature_stats(pixels, FEATURE_PIXELS)
        if pixel_feature is not None:
            served.datasets[0].features.add().CopyFrom(pixel_feature)
    return served


def _schema_without_pixel_skew(schema: schema_pb2.Schema) -> schema_pb2.Schema:
    """A copy of `schema` whose pixels are not compared (a window without the histogram)."""
    copy = schema_pb2.Schema()
    copy.CopyFrom(schema)
    for feature in copy.feature:
        if feature.name == FEATURE_PIXELS:
            feature.ClearField("skew_comparator")
    return copy


def _schema_check(served_faces: statistics_pb2.DatasetFeatureStatisticsList,
                  schema: schema_pb2.Schema
                  ) -> tuple[dict[str, Any], anomalies_pb2.Anomalies]:
    """The served faces validated against the schema's SERVING environment; any anomaly
    is an alert, even in a window with too few faces to judge the distances."""
    serving = tfdv.validate_statistics(served_faces, schema, environment=SERVING_ENVIRONMENT)
    problems = {name: info.description for name, info in serving.anomaly_info.items()}
    check = {"name": SCHEMA_CHECK, "kind": "schema", "measure": "anomalies",
             "distance": float(len(problems)), "threshold": 0.0,
             "description": "; ".join(f"{k}: {v}" for k, v in sorted(
                 problems.items())) or "served faces match the schema",
             "alert": bool(problems)}
    return check, serving


def _face_checks(faces: statistics_pb2.DatasetFeatureStatistics,
                 pixels: Optional[statistics_pb2.DatasetFeatureStatisticsList],
                 reference: LoadedReference, config: MonitorConfig, judged: bool
                 ) -> tuple[Checks, dict[str, anomalies_pb2.Anomalies]]:
    """The faces against the train split: image features, pixels, the schema."""
    include_pixels = pixels is not None
    served_faces = _served_face_statistics(faces, pixels)
    schema = (reference.face_schema if include_pixels
              else _schema_without_pixel_skew(reference.face_schema))
    measured, skew_anomalies = _skew(reference.train_stats, served_faces, schema,
                                     SERVING_ENVIRONMENT)
    checks = [_check(name, "image", "l_infinity" if name in CATEGORICAL_FEATURES
                     else "jensen_shannon_divergence",
                     *measured.get(name, (None, getattr(config, field_name))), judged,
                     description)
              for name, (description, field_name) in IMAGE_FEATURES.items()]
    anomalies = {"skew": skew_anomalies}
    if include_pixels:
        checks.append(_check(PIXELS_CHECK, "image", "jensen_shannon_divergence",
                             *measured.get(PIXELS_CHECK, (None, config.pixels_js)), judged,
                             "histogram of every pixel value (TFDV)"))
        schema_check, anomalies["serving"] = _schema_check(served_faces,
                                                           reference.face_schema)
        checks.append(schema_check)
    return checks, anomalies


def answer_names(faces: statistics_pb2.DatasetFeatureStatistics, primary: Mapping[str, int],
                 combo: Optional[str]) -> dict[str, str]:
    """{feature in the job's statistics: its name in the answers schema} for the served
    versions' answers (and their review flag) that the window's statistics hold."""
    present = {f.path.step[0] if f.path.step else f.name for f in faces.features}
    names = {}
    for model, version in primary.items():
        for kind in ("class", "confidence"):
            if answer_feature(kind, model, version) in present:
                names[answer_feature(kind, model, version)] = f"{kind}_{model}"
    if combo and review_feature(combo) in present:
        names[review_feature(combo)] = REVIEW_FEATURE
    return names


def _answer_checks(faces: statistics_pb2.DatasetFeatureStatistics,
                   primary: Mapping[str, int], combo: Optional[str],
                   reference: LoadedReference, config: MonitorConfig, judged: bool
                   ) -> tuple[Checks, anomalies_pb2.Anomalies]:
    """The answers against the test split: per model class mix and confidence, and the
    ensemble's review rate (only where both sides have one)."""
    names = answer_names(faces, primary, combo)
    models = [m for m in primary if m in reference.answers.class_ids
              and f"class_{m}" in names.values()]
    with_review = REVIEW_FEATURE in names.values() and reference.answers.review is not None
    keep = set(models) | ({REVIEW_FEATURE} if with_review else set())
    wanted = {f"class_{m}" for m in models} | {f"confidence_{m}" for m in models} | (
        {REVIEW_FEATURE} if with_review else set())
    measured, anomalies = _skew(
        reference.answer_statistics(keep),
        served_subset(faces, {k: v for k, v in names.items() if v in wanted}),
        answers_schema(models, with_review, config))
    checks = []
    for model in models:
        checks.append(_check(f"class_mix:{model}", "class_mix", "l_infinity",
                             *measured.get(f"class_{model}", (None, config.class_mix_linf)),
                             judged, f"{model}'s predicted-class shares"))
        checks.append(_check(f"confidence:{model}", "confidence", "jensen_shannon_divergence",
                             *measured.get(f"confidence_{model}", (None, config.confidence_js)),
                             judged, f"{model}'s confidence in its answer"))
    if with_review:
        checks.append(_check(REVIEW_CHECK, "review_rate", "l_infinity",
                             *measured.get(REVIEW_FEATURE, (None, config.review_rate_linf)),
                             judged, "share of faces the ensemble sends to a person"))
    return checks, anomalies


def compare(faces: statistics_pb2.DatasetFeatureStatistics,
            pixels: Optional[statistics_pb2.DatasetFeatureStatisticsList],
            primary: Mapping[str, int], combo: Optional[str], reference: LoadedReference,
            config: MonitorConfig, judged: bool
            ) -> tuple[Checks, dict[str, anomalies_pb2.Anomalies]]:
    """Every check of one window (`faces`: its slice of the job's statistics; `pixels`:
    the pixel statistics, None for a time window): the faces against the train split, the
    answers against the test split. `judged=False` (too few faces) measures without
    alerting."""
    checks, anomalies = _face_checks(faces, pixels, reference, config, judged)
    answer_checks, anomalies["answers"] = _answer_checks(faces, primary, combo, reference,
                                                         config, judged)
    return checks + answer_checks, anomalies


def bad_records_check(records: int, bad: Mapping[str, int],
                      config: MonitorConfig) -> dict[str, Any]:
    """The share of the window's records that cannot be decoded or break the serving
    schema; above monitor.max_bad_share it alerts, however few faces the window has."""
    total = sum(bad.values())
    share = total / records if records else 0.0
    return {"name": BAD_CHECK, "kind": "records", "measure": "share",
            "distance": share, "threshold": config.max_bad_share,
            "description": ("records that cannot be decoded or break the serving schema: "
                            + ("; ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
                               or "none")),
            "alert": bool(share > config.max_bad_share)}


def verdict(faces: int, alerts: list[str], checks: Checks,
            config: MonitorConfig) -> tuple[str, str]:
    """The window's verdict ("ok", "drift" or "too few requests") and one line saying why.
    Too many bad records, or served faces that break the schema's SERVING environment, are
    news however few faces the window has (neither is a distance that needs many faces)."""
    bad = any(c["alert"] and c["kind"] in ("records", "schema") for c in checks)
    if faces < config.min_requests and not bad:
        return ("too few requests",
                f"{faces} faces in the window, fewer than monitor.min_requests "
                f"({config.min_requests}): distances shown, no alert raised")
    if not alerts:
        return "ok", f"no drift: {faces} faces, every distance within its threshold"
    crossed = [c for c in checks if c["alert"]]
    parts = [f"schema: {c['description']}" if c["kind"] == "schema"
             else f"{c['name']} {c['distance']:.3f} > {c['threshold']:.3f} ({c['description']})"
             if c["kind"] == "records"
             else f"{c['name']} {c['distance']:.3f} > {c['threshold']:.3f}" for c in crossed]
    return "drift", f"drift in {faces} faces: " + "; ".join(parts)

