"""BulkInferrer: every face of a FER-2013 CSV or a directory of photos, scored by the served
models on Beam, combined by the ensemble rule, committed as one output.

The Beam pipeline, top to bottom (each part in its module):

1. faces in (reading.py): a CSV's rows read in line-aligned chunks as ingest reads them, or
   a directory's files matched and read by the workers and cut into faces; rows and files
   that give no face become rejected records with a reason;
2. scoring (scoring.py): per face, each model's `serving_examples` signature through Beam's
   `RunInference` (one PredictionLog per face and model, written as TFRecords), then the
   ensemble rule, all in one fused stage;
3. records out (outputs.py): predictions, rejected rows and (with a review queue) the
   flagged faces written by Beam sinks as shards into a fresh execution directory.

The driver plans the work, then reads back only the job's Beam metrics (counts.py: a
record read but never written fails the job) and the flagged faces for the review queue
(review.py), writes `inference.json`, and commits: `COMMIT.json`, written last, names the
execution directory (core/artifacts.py). Readers trust only the record, so a job that fails
or is killed leaves the previous outputs whole and in force.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict
from typing import Any, Optional, Sequence

from fer_pipeline.components.bulk_inferrer.counts import JobCounts, check_counts, job_counts
from fer_pipeline.components.bulk_inferrer.outputs import (FLAGGED_DIR, OUTPUT_DIRS,
                                                           jsonl_records, shard_pattern,
                                                           write_records)
from fer_pipeline.components.bulk_inferrer.reading import (REJECTED, has_files, read_csv_faces,
                                                           read_image_faces)
from fer_pipeline.components.bulk_inferrer.records import BulkInferenceResult, ModelVersion
from fer_pipeline.components.bulk_inferrer.review import queue_for_review
from fer_pipeline.components.bulk_inferrer.scoring import FLAGGED, score_faces
from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import (EXECUTION_PREFIX, Commit, commit, fingerprint,
                                         remove_uncommitted)
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import EvalConfig, InferenceConfig
from fer_pipeline.core.contract import (INFERENCE_RESULT_FILE, NUM_CLASSES, OUTPUT_PROBABILITIES,
                                        PREDICTION_LOGS_DIR, SIGNATURE_EXAMPLES)
from fer_pipeline.core.ensemble import shared_class_count
from fer_pipeline.core.errors import InputDataError, MissingInputError, RecordsLost
from fer_pipeline.core.fer_csv import read_header

__all__ = ["INFER_STEP", "build_pipeline", "run_bulk_inferrer"]

INFER_STEP = "infer"


def build_pipeline(faces_and_rejected: Any, models: Sequence[ModelVersion],
                   execution_dir: str, config: InferenceConfig, tolerance: float,
                   keep_flagged_pixels: bool) -> None:
    """Scoring and the sinks, after the faces are read."""
    scored = score_faces(faces_and_rejected.faces, models, config, tolerance,
                         keep_flagged_pixels, fileio.join(execution_dir, PREDICTION_LOGS_DIR))
    write_records(scored.predictions, faces_and_rejected[REJECTED],
                  scored[FLAGGED] if keep_flagged_pixels else None, execution_dir,
                  [m.name for m in models])


def _class_count(saved_model_dir: str) -> int:
    """The width of a SavedModel's served probabilities, read from its signature (no
    loading of the model); FER-2013's 7 when the signature does not say."""
    from tensorflow.core.protobuf import saved_model_pb2
    path = fileio.join(saved_model_dir, "saved_model.pb")
    if not fileio.exists(path):
        return NUM_CLASSES       # the job's own loading says what is wrong
    saved = saved_model_pb2.SavedModel.FromString(fileio.read_bytes(path))
    for meta_graph in saved.meta_graphs:
        signature = meta_graph.signature_def.get(SIGNATURE_EXAMPLES)
        output = signature.outputs.get(OUTPUT_PROBABILITIES) if signature else None
        if output is not None and output.tensor_shape.dim:
            width = int(output.tensor_shape.dim[-1].size)
            return width if width > 0 else NUM_CLASSES
    return NUM_CLASSES


def _new_execution_dir(output_dir: str) -> str:
    """A directory no reader looks at until a commit record names it."""
    name = EXECUTION_PREFIX + time.strftime("%Y%m%dT%H%M%S-") + secrets.token_hex(3)
    return fileio.join(output_dir, name)


def _run_job(data_uri: str, is_directory: bool, models: Sequence[ModelVersion],
             execution_dir: str, config: InferenceConfig, tolerance: float,
             keep_flagged_pixels: bool, beam_args: list[str]) -> JobCounts:
    """Runs the Beam job into `execution_dir` and returns its checked counts."""
    with beam_pipeline(beam_args, INFER_STEP) as pipeline:
        faces = (read_image_faces(pipeline, data_uri) if is_directory
                 else read_csv_faces(pipeline, data_uri))
        build_pipeline(faces, models, execution_dir, config, tolerance, keep_flagged_pixels)
    counts = job_counts(pipeline.result)
    if counts.inputs_read == 0:
        raise InputDataError(f"{data_uri}: no {'files' if is_directory else 'rows'} to read "
                             "faces from")
    check_counts(counts, [m.name for m in models], "files" if is_directory else "rows")
    return counts


def run_bulk_inferrer(data_uri: str, models: Sequence[ModelVersion], output_dir: str,
                      review_queue: Optional[str], config: InferenceConfig,
                      beam_args: list[str]) -> BulkInferenceResult:
    """Scores every face of `data_uri` (a FER-2013 CSV, or a directory of photos) with each
    of `models` and the ensemble rule, into a new execution directory under `output_dir`
    that `output_dir/COMMIT.json` names once everything is written (outputs.py: the
    layout). With `review_queue` (a local directory), the faces that need a person are
    queued for `fer-review`.
    """
    started = time.time()
    # Unset only when the config was built by hand rather than loaded (load_config fills in
    # evaluation's): the evaluation's default rule, then.
    tolerance = (config.tie_tolerance if config.tie_tolerance is not None
                 else EvalConfig().tie_tolerance)
    if not models:
        raise ValueError("bulk inference needs at least one model")
    fileio.configure_beam_filesystems(beam_args)
    if len(models) > 1:
        # A FER-2013 (7-class) and a FER+ (8-class) model have no ensemble: say so before
        # the job, in one line, rather than from inside a worker (core/ensemble.py).
        shared_class_count({m.name: _class_count(m.path) for m in models})
    if not fileio.exists(data_uri):
        raise MissingInputError(f"{data_uri} does not exist")
    is_directory = fileio.isdir(data_uri)
    if is_directory and not has_files(data_uri):
        raise InputDataError(f"{data_uri}: no files to read faces from")
    if not is_directory:
        read_header(data_uri, label_required=False)  # a CSV we cannot read creates nothing
    execution_dir = _new_execution_dir(output_dir)
    fileio.makedirs(execution_dir)
    try:
        counts = _run_job(data_uri, is_directory, models, execution_dir, config, tolerance,
                          review_queue is not None, beam_args)
        review = (queue_for_review(review_queue, jsonl_records(
            shard_pattern(execution_dir, FLAGGED_DIR)), models, config.explain_flagged)
                  if review_queue is not None else {})
        if review and review["flagged"] != counts.needs_review:
            raise RecordsLost(f"bulk inference lost records ({counts.needs_review} faces "
                              f"need review, but {review['flagged']} were written for the "
                              "queue); nothing was committed")
    except BaseException:
        # Nothing names it, so nobody reads it; a killed job's directory is removed by the
        # next commit (remove_uncommitted).
        fileio.rmtree(execution_dir)
        raise
    result = BulkInferenceResult(
        input_kind="images" if is_directory else "csv",
        inputs_read=counts.inputs_read,
        faces_scored=counts.faces_scored,
        rejected=counts.rejected,
        rejected_by_reason=counts.rejected_by_reason,
        needs_review=counts.needs_review,
        decisions=counts.decisions,
        models={m.name: {"version": m.version, "path": m.path} for m in models},
        tolerance=tolerance,
        output_dir=output_dir,
        predictions_path=shard_pattern(execution_dir, "predictions"),
        rejected_path=shard_pattern(execution_dir, "rejected"),
        prediction_logs={m.name: fileio.join(execution_dir, PREDICTION_LOGS_DIR, m.name,
                                             "prediction_logs-*-of-*.tfrecord")
                         for m in models},
        review_queue=review,
        seconds=round(time.time() - started, 3),
        execution_dir=execution_dir)
    fileio.write_json(fileio.join(execution_dir, INFERENCE_RESULT_FILE), asdict(result))
    _commit(output_dir, execution_dir, result, started)
    return result


def _commit(output_dir: str, execution_dir: str, result: BulkInferenceResult,
            started: float) -> None:
    """Publishes the execution directory (the record is written last), then removes the
    executions no record names: the one it replaced and any a killed job left."""
    outputs = {}
    for name, directory in OUTPUT_DIRS.items():
        uri = fileio.join(execution_dir, directory)
        outputs[name] = {"uri": uri, "fingerprint": fingerprint(uri)}
    manifest = {"step": INFER_STEP, "result": asdict(result), "outputs": outputs,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "duration_s": round(time.time() - started, 3)}
    # Bulk inference is never skipped as unchanged (the served versions move on), so the
    # record has no cache key.
    commit(output_dir, Commit(INFER_STEP, fileio.basename(execution_dir), execution_dir, "",
                              outputs, manifest))
    remove_uncommitted(output_dir)
