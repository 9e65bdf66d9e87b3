"""Bulk inference as a job (`fer-pipeline infer`, and its Kubeflow component).

It is not a step of the training DAG: it scores data the pipeline never trained on, with
whatever versions are in serving now. So it resolves which versions those are (from the
serving root's models.config, as TF Serving does, or versions named by the caller; named
none, every model models.config serves), runs `components/bulk_inferrer/` into its output
directory (which commits it there as a step commits its output), and records the execution
in ML Metadata the way the runner records a step: the data and each pushed model version
it read (the same `pushed_model` artifacts the push step records, so lineage connects them
when both use one store), and the predictions it committed.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import fingerprint
from fer_pipeline.core.config import MODEL_NAMES, MetadataConfig, PipelineConfig
from fer_pipeline.pipeline.metadata import ArtifactRecord, MetadataStore

from fer_pipeline.components.bulk_inferrer import (BulkInferenceResult, ModelVersion,
                                                   read_committed, run_bulk_inferrer)
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.serving_root import latest_served_version, version_dirs

INFER_STEP = "infer"   # the execution type in ML Metadata: fer.step.infer


def served_models(serving_root: str) -> list[str]:
    """The registered models that the serving root serves a version of (what its
    models.config names; without one, as TF Serving would load the root), in registry
    order. ConfigError when there is none."""
    served = [name for name in MODEL_NAMES
              if latest_served_version(serving_root, name) is not None]
    if not served:
        raise ConfigError(f"no model is served from {serving_root} (no version that its "
                          "models.config names); name versions with --models NAME:VERSION")
    return served


def resolve_models(serving_root: str, wanted: Sequence[str]) -> list[ModelVersion]:
    """`cnn` -> the version of cnn in serving now; `cnn:3` -> version 3 of cnn under the
    serving root; nothing named -> every served model (served_models). ConfigError (one
    line) for an unknown model or a version that is not there.
    """
    wanted = list(wanted) or served_models(serving_root)
    resolved = []
    for item in wanted:
        name, _, version_text = item.strip().partition(":")
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; registered models: {list(MODEL_NAMES)}")
        if version_text:
            if not version_text.isdigit():
                raise ConfigError(f"{item!r}: a version is a number, e.g. {name}:3")
            version = int(version_text)
            if version not in version_dirs(serving_root, name):
                raise ConfigError(f"{name} has no version {version} under {serving_root} "
                                  f"(there: {version_dirs(serving_root, name) or 'none'})")
            resolved.append(ModelVersion(name, version,
                                         fileio.join(serving_root, name, str(version))))
            continue
        served = latest_served_version(serving_root, name)
        if served is None:
            raise ConfigError(f"{name} is not served from {serving_root} (the gate may have "
                              "held it back); leave it out of --models or name a version")
        resolved.append(ModelVersion(name, served[0], served[1]))
    names = [version.name for version in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"each model may be named once in --models, got {list(wanted)}")
    return resolved


def _check_review_queue(path: str) -> None:
    """Before the job runs, not after: the queue is a local directory (one SQLite file)."""
    if fileio.is_uri(path):
        raise ConfigError(f"--review-queue {path}: the review queue is a local directory "
                          "(one SQLite file), not an object-store URI")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--review-queue {path} is a file; give the queue's directory")


def run_inference_job(data_uri: str, output_dir: str, serving_root: str,
                      models: Sequence[str], config: PipelineConfig, beam_args: list[str],
                      review_queue: Optional[str] = None,
                      metadata: Optional[MetadataConfig] = None) -> BulkInferenceResult:
    """Resolves the model versions, scores `data_uri` into `output_dir` and, given a
    `metadata` store (the default SQLite file is `<output_dir>/metadata.sqlite`), records
    the execution in ML Metadata."""
    started = time.time()
    versions = resolve_models(serving_root, models)
    if review_queue is not None:
        _check_review_queue(review_queue)
    result = run_bulk_inferrer(data_uri, versions, output_dir, review_queue, config.inference,
                               beam_args)
    if metadata is None:
        return result
    store = MetadataStore(metadata, output_dir)
    inputs = {"data": [ArtifactRecord("data", fileio.absolute(data_uri),
                                      fingerprint(data_uri))]}
    for version in versions:
        inputs[f"model_{version.name}"] = [ArtifactRecord(
            "pushed_model", version.path, fingerprint(version.path),
            {"model": version.name, "version": version.version,
             "serving_root": serving_root})]
    predictions = read_committed(output_dir).output_uri("predictions")
    store.record_job(INFER_STEP, inputs, "predictions", predictions, result, started,
                     result.execution_dir)
    return result
