"""BulkInferrer: every face of a FER-2013 CSV or a directory of photos, scored by the served
models on Beam, combined by the ensemble rule.

The Beam pipeline, top to bottom:

1. faces in: a CSV is read exactly as ingest reads it (`core/fer_csv.py`: the
   same line-aligned chunks, the same strict row parser, so the same rows are rejected with
   the same reasons), except that the label is optional and any Usage is accepted; a
   directory's image files are read through Beam's FileSystems (local or object store) and
   cut into 48x48 faces by `serving/faces.py`, as `fer-client --image` does. A row that does
   not parse, a file that is not an image and an image without a face go to the rejected
   records with a reason, never silently dropped;
2. every face becomes the raw tf.Example of docs/architecture.md (`pixels`, plus `source`)
   keyed by where it came from;
3. per model, Beam's `RunInference` with `ServingSignatureHandler` (below) on the model's
   `serving_examples` signature, the signature TFX's BulkInferrer runs, giving one
   `PredictionLog` per face, stamped with the model's name and version and written as
   TFRecords;
4. the models' answers are joined by key and combined with `core/ensemble.py` (most
   confident wins; a disagreement within the tolerance goes to human review);
5. JSON-lines reports that the driver turns into `predictions.csv` (sorted by source, row
   and face), `rejected.csv` and, with a review queue, the flagged faces queued for
   `fer-review` with each model's saliency maps (its `explain` signature, when it has one).

Why our own handler (about forty lines) and not a ready-made one, both tried with our pins:
tfx_bsl 1.16.1's SavedModel handler (TFX's choice) fails on our signatures: it splits every
output per example and reads `.dtype` of each piece, which a scalar string (`class_name`,
returned by every signature we export) does not have ("'bytes' object has no attribute
'dtype'"). Beam 2.59's `TFModelHandlerNumpy/Tensor` import tensorflow_hub (not installed)
and load the model with `tf.keras.models.load_model`, then call the model object itself,
where our SavedModels are tf.Modules whose entry points are named serving signatures. The
handler here loads the SavedModel as TF Serving does, calls the signature on a batch, and
writes the request and response as a TF Serving `PredictionLog`, the format tfx_bsl's
handler produces and TF Serving's request logs use.

Every function Beam pickles is module-level here so multi-process and portable runners can
import it.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from fer_pipeline.components.bulk_inferrer.outputs import (prediction_order, queue_for_review,
                                                           write_predictions_csv)
from fer_pipeline.components.bulk_inferrer.records import BulkInferenceResult, Face, ModelVersion
from fer_pipeline.core.fer_csv import (JSONL_HEADER, READ_CHUNK_BYTES, CsvColumns,
                                    ReadChunkLines, RowError, parse_row, plan_chunks,
                                    read_header, read_jsonl, reason_code, rejection,
                                    write_rejected_csv)
from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import EvalConfig, InferenceConfig
from fer_pipeline.core.contract import (FEATURE_PIXELS, FEATURE_SOURCE, INFERENCE_REJECTED_FILE,
                                        INFERENCE_RESULT_FILE, INPUT_EXAMPLES, OUTPUT_PROBABILITIES,
                                        PREDICTION_LOGS_DIR, PREDICTIONS_FILE, SIGNATURE_EXAMPLES)
from fer_pipeline.core.ensemble import combine
from fer_pipeline.core.errors import InputDataError, MissingInputError
from fer_pipeline.serving.faces import FaceDetectionConfig, decode_grayscale, faces_in_image

__all__ = ["run_bulk_inferrer"]

_REJECTED = "rejected"
_BEAM_TMP = ".beam_tmp"


# ---------------------------------------------------------------------------------------
# Faces in (Beam workers)

class ParseCsvFaces(beam.DoFn):
    """(line, raw bytes) -> a Face; tagged `rejected`: the row with ingest's reason."""

    def __init__(self, data_path: str, columns: CsvColumns):
        self._path = data_path
        self._columns = columns

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        line, raw = element
        try:
            label, pixels, usage = parse_row(raw, self._columns)
        except RowError as error:
            yield beam.pvalue.TaggedOutput(_REJECTED, {**rejection(line, str(error), raw),
                                                       "source": self._path})
            return
        yield Face(f"{self._path}:{line}", self._path, line, None, None, label, usage, pixels)


class FindFaces(beam.DoFn):
    """An image file's path -> one Face per face found; tagged `rejected`: the file with
    why it gave none (not an image, no face found)."""

    def __init__(self, detection: FaceDetectionConfig):
        self._detection = detection

    def process(self, path: str) -> Iterator[Any]:
        try:
            with FileSystems.open(path) as handle:
                data = handle.read()
            faces = faces_in_image(decode_grayscale(data, path), self._detection)
        except (OSError, ValueError) as error:
            yield beam.pvalue.TaggedOutput(_REJECTED, _file_rejection(
                path, f"unreadable_image: {_first_line(error)}"))
            return
        if not faces:
            yield beam.pvalue.TaggedOutput(_REJECTED, _file_rejection(
                path, "no_face_found: the face detector found no frontal face"))
        for index, found in enumerate(faces):
            yield Face(f"{path}#face{index}", path, None, index, list(found.box), None, "",
                       np.ascontiguousarray(found.pixels, np.uint8).tobytes())


def _file_rejection(path: str, reason: str) -> dict[str, Any]:
    return {"line_number": None, "reason": reason, "raw_line": None, "source": path}


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


def keyed_example(face: Face) -> tuple[str, bytes]:
    """(key, serialized raw tf.Example): what the `serving_examples` signature reads."""
    import tensorflow as tf  # in the worker; the driver only needs TF for explanations

    feature = tf.train.Feature
    return face.key, tf.train.Example(features=tf.train.Features(feature={
        FEATURE_PIXELS: feature(bytes_list=tf.train.BytesList(value=[face.pixels])),
        FEATURE_SOURCE: feature(bytes_list=tf.train.BytesList(value=[face.key.encode()])),
    })).SerializeToString()


def keyed_face(face: Face) -> tuple[str, Face]:
    return face.key, face


# ---------------------------------------------------------------------------------------
# Inference and the ensemble (Beam workers)

class ServingSignatureHandler(ModelHandler):
    """Beam ModelHandler: serialized tf.Examples -> PredictionLogs from one SavedModel's
    `serving_examples` signature (why not tfx_bsl's or Beam's TF handler: module doc)."""

    def __init__(self, model: ModelVersion, config: InferenceConfig):
        super().__init__()
        self._model = model
        self._batch = {"min_batch_size": config.min_batch_size,
                       "max_batch_size": config.max_batch_size}

    def load_model(self) -> Any:
        import tensorflow as tf

        loaded = tf.saved_model.load(self._model.path)
        if SIGNATURE_EXAMPLES not in loaded.signatures:
            raise InputDataError(f"{self._model.path}: the SavedModel has no "
                                 f"{SIGNATURE_EXAMPLES!r} signature")
        return loaded   # the signature keeps a reference to it; the object must live

    def run_inference(self, batch: Sequence[bytes], model: Any,
                      inference_args: Optional[dict[str, Any]] = None) -> list[Any]:
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        outputs = {name: value.numpy() for name, value in
                   model.signatures[SIGNATURE_EXAMPLES](
                       examples=tf.constant(list(batch), tf.string)).items()}
        logs = []
        for index, example in enumerate(batch):
            log = prediction_log_pb2.PredictionLog()
            request, response = log.predict_log.request, log.predict_log.response
            for spec in (request.model_spec, response.model_spec):
                spec.name = self._model.name
                spec.version.value = self._model.version
                spec.signature_name = SIGNATURE_EXAMPLES
            request.inputs[INPUT_EXAMPLES].CopyFrom(tf.make_tensor_proto([example]))
            for name, value in outputs.items():
                # TF Serving's answer for a batch of one: the batch dimension kept.
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value[index:index + 1]))
            logs.append(log)
        return logs

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(example) for example in batch)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return self._batch


def model_handler(model: ModelVersion, config: InferenceConfig) -> KeyedModelHandler:
    return KeyedModelHandler(ServingSignatureHandler(model, config))


def log_value(keyed_log: tuple[str, Any]) -> Any:
    return keyed_log[1]


def probabilities_of(log: Any) -> list[float]:
    import tensorflow as tf

    return tf.make_ndarray(log.predict_log.response.outputs[OUTPUT_PROBABILITIES]
                           ).reshape(-1).astype(float).tolist()


def decide(element: tuple[str, dict[str, list]], models: Sequence[ModelVersion],
           tolerance: float, keep_flagged_pixels: bool) -> Iterator[dict[str, Any]]:
    """One face's models' answers -> its prediction record (the ensemble's decision)."""
    key, grouped = element
    [face] = grouped["face"]
    probabilities = {}
    for model in models:
        [log] = grouped[model.name]   # exactly one answer per model and face
        probabilities[model.name] = probabilities_of(log)
    decision = combine(probabilities, tolerance)
    record = {
        "key": key, "source": face.source, "row": face.row, "face": face.face,
        "box": face.box, "label": face.label, "usage": face.usage,
        "models": {m.name: {"version": m.version, "probabilities": probabilities[m.name]}
                   for m in models},
        "decision": asdict(decision),
    }
    if keep_flagged_pixels and decision.needs_human_review:
        record["pixels_b64"] = base64.b64encode(face.pixels).decode()
    yield record


# ---------------------------------------------------------------------------------------
# The pipeline

def build_pipeline(pipeline: beam.Pipeline, faces_and_rejected: Any,
                   models: Sequence[ModelVersion], output_dir: str, config: InferenceConfig,
                   tolerance: float, keep_flagged_pixels: bool) -> None:
    tmp = fileio.join(output_dir, _BEAM_TMP)
    faces = faces_and_rejected.faces
    examples = faces | "ToExamples" >> beam.Map(keyed_example)
    joined: dict[str, Any] = {"face": faces | "KeyFaces" >> beam.Map(keyed_face)}
    for model in models:
        logs = (examples
                | f"Infer_{model.name}" >> RunInference(model_handler(model, config)))
        (logs
         | f"Logs_{model.name}" >> beam.Map(log_value)
         | f"WriteLogs_{model.name}" >> beam.io.WriteToTFRecord(
             fileio.join(tmp, PREDICTION_LOGS_DIR, model.name, "prediction_logs"),
             coder=beam.coders.ProtoCoder(_prediction_log_class()),
             file_name_suffix=".tfrecord", num_shards=config.num_shards,
             shard_name_template="-SSSSS-of-NNNNN"))
        joined[model.name] = logs
    (joined
     | "JoinModels" >> beam.CoGroupByKey()
     | "Ensemble" >> beam.FlatMap(decide, list(models), tolerance, keep_flagged_pixels)
     | "PredictionsJson" >> beam.Map(json.dumps)
     | "WritePredictions" >> beam.io.WriteToText(fileio.join(tmp, "predictions"), ".jsonl",
                                                 header=JSONL_HEADER))
    (faces_and_rejected[_REJECTED]
     | "RejectedJson" >> beam.Map(json.dumps)
     | "WriteRejected" >> beam.io.WriteToText(fileio.join(tmp, "rejected"), ".jsonl",
                                              header=JSONL_HEADER))


def _prediction_log_class():
    from tensorflow_serving.apis import prediction_log_pb2

    return prediction_log_pb2.PredictionLog


def read_csv_faces(pipeline: beam.Pipeline, data_path: str) -> Any:
    """The CSV's faces and rejected rows, read as ingest reads them."""
    columns = read_header(data_path, label_required=False)
    return (pipeline
            | "Chunks" >> beam.Create(plan_chunks(data_path, READ_CHUNK_BYTES))
            | "Spread" >> beam.Reshuffle()
            | "ReadLines" >> beam.ParDo(ReadChunkLines(data_path))
            | "Parse" >> beam.ParDo(ParseCsvFaces(data_path, columns)).with_outputs(
                _REJECTED, main="faces"))


def read_image_faces(pipeline: beam.Pipeline, paths: Sequence[str]) -> Any:
    """The faces found in each image file and the files that gave none."""
    return (pipeline
            | "Files" >> beam.Create(list(paths))
            | "SpreadFiles" >> beam.Reshuffle()
            | "FindFaces" >> beam.ParDo(FindFaces(FaceDetectionConfig())).with_outputs(
                _REJECTED, main="faces"))


def image_files(directory: str) -> list[str]:
    """Every file under `directory` (recursively, sorted) but hidden ones (`.DS_Store`,
    `.git/`); each is tried as an image, and one that is not is reported in rejected.csv
    rather than skipped by its name."""
    return [full for rel, full in fileio.walk_files(directory)
            if not any(part.startswith(".") for part in rel.split("/"))]


def run_bulk_inferrer(data_uri: str, models: Sequence[ModelVersion], output_dir: str,
                      review_queue: Optional[str], config: InferenceConfig,
                      beam_args: list[str]) -> BulkInferenceResult:
    """Scores every face of `data_uri` (a FER-2013 CSV, or a directory of photos) with each
    of `models` and the ensemble rule; writes `predictions.csv`, `rejected.csv`, the
    PredictionLogs and `inference.json` (last) under `output_dir`. With `review_queue` (a
    local directory), the faces that need a person are queued for `fer-review`.
    """
    started = time.time()
    # Unset only when the config was built by hand rather than loaded (load_config fills in
    # evaluation's): the evaluation's default rule, then.
    tolerance = (config.tie_tolerance if config.tie_tolerance is not None
                 else EvalConfig().tie_tolerance)
    if not models:
        raise ValueError("bulk inference needs at least one model")
    fileio.configure_beam_filesystems(beam_args)
    if not fileio.exists(data_uri):
        raise MissingInputError(f"{data_uri} does not exist")
    is_directory = fileio.isdir(data_uri)
    paths = image_files(data_uri) if is_directory else []
    if is_directory and not paths:
        raise InputDataError(f"{data_uri}: no files to read faces from")
    if not is_directory:
        read_header(data_uri, label_required=False)  # a CSV we cannot read creates nothing
    # The job writes under a temporary directory; a failed job leaves the previous
    # results in output_dir as they were.
    tmp = fileio.join(output_dir, _BEAM_TMP)
    fileio.rmtree(tmp)
    fileio.makedirs(output_dir)

    with beam_pipeline(beam_args, "infer") as pipeline:
        faces = (read_image_faces(pipeline, paths) if is_directory
                 else read_csv_faces(pipeline, data_uri))
        build_pipeline(pipeline, faces, models, output_dir, config, tolerance,
                       keep_flagged_pixels=review_queue is not None)

    records = sorted(read_jsonl(fileio.join(tmp, "predictions*")), key=prediction_order)
    rejected = sorted(read_jsonl(fileio.join(tmp, "rejected*")),
                      key=lambda r: (r["source"], r["line_number"] or 0))
    logs_dir = fileio.join(output_dir, PREDICTION_LOGS_DIR)
    fileio.rmtree(logs_dir)
    fileio.copytree(fileio.join(tmp, PREDICTION_LOGS_DIR), logs_dir)
    fileio.rmtree(tmp)
    names = [m.name for m in models]
    predictions_path = fileio.join(output_dir, PREDICTIONS_FILE)
    write_predictions_csv(predictions_path, records, names)
    rejected_path = fileio.join(output_dir, INFERENCE_REJECTED_FILE)
    write_rejected_csv(rejected_path, rejected)

    flagged = [r for r in records if r["decision"]["needs_human_review"]]
    review = (queue_for_review(review_queue, flagged, models, config.explain_flagged)
              if review_queue is not None else {})
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[reason_code(r["reason"])] = by_reason.get(reason_code(r["reason"]), 0) + 1
    decisions: dict[str, int] = {}
    for r in records:
        decisions[r["decision"]["class_name"]] = decisions.get(r["decision"]["class_name"], 0) + 1
    scored_files = {r["source"] for r in records}
    result = BulkInferenceResult(
        input_kind="images" if is_directory else "csv",
        inputs_read=(len(paths) if is_directory
                     else len(records) + len(rejected)),
        faces_scored=len(records),
        rejected=len(rejected),
        rejected_by_reason=dict(sorted(by_reason.items())),
        needs_review=len(flagged),
        decisions=dict(sorted(decisions.items())),
        models={m.name: {"version": m.version, "path": m.path} for m in models},
        tolerance=tolerance,
        output_dir=output_dir,
        predictions_path=predictions_path,
        rejected_path=rejected_path,
        prediction_logs={m.name: fileio.join(output_dir, PREDICTION_LOGS_DIR, m.name,
                                             "prediction_logs-*.tfrecord") for m in models},
        review_queue=review,
        seconds=round(time.time() - started, 3))
    if is_directory and len(scored_files) + len(rejected) != len(paths):
        raise RuntimeError(f"{len(paths)} files read, but {len(scored_files)} gave faces and "
                           f"{len(rejected)} were rejected: a file went missing")
    fileio.write_json(fileio.join(output_dir, INFERENCE_RESULT_FILE), asdict(result))
    return result
