"""Scoring (Beam workers): each face through every model, then the ensemble rule.

Every face becomes the raw tf.Example of docs/architecture.md (`pixels`, plus `source`).
For each model in turn, Beam's `RunInference` with `ServingSignatureHandler` (below) calls
the model's `serving_examples` signature, the signature TFX's BulkInferrer runs, giving one
`PredictionLog` per face, stamped with the model's name and version and written as
TFRecords. The face travels with its answers as RunInference's key, so the models run one
after the other on the same element and the ensemble (`core/ensemble.py`: most confident
wins; a disagreement within the tolerance goes to human review) decides right after the
last one: no join by key, so no shuffle holds every face's answers at once, and the whole
path from a CSV chunk or a photo to the written records is one fused Beam stage.

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
from dataclasses import asdict
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from fer_pipeline.components.bulk_inferrer.counts import SCORED, count
from fer_pipeline.components.bulk_inferrer.records import Face, ModelVersion
from fer_pipeline.core import fileio
from fer_pipeline.core.config import InferenceConfig
from fer_pipeline.core.contract import (FEATURE_PIXELS, FEATURE_SOURCE, INPUT_EXAMPLES,
                                        OUTPUT_PROBABILITIES, SIGNATURE_EXAMPLES)
from fer_pipeline.core.ensemble import combine
from fer_pipeline.core.errors import InputDataError

__all__ = ["FLAGGED", "ServingSignatureHandler", "decide", "keyed_example", "model_handler",
           "score_faces"]

FLAGGED = "flagged"   # the tagged output of the faces that need a person, with their pixels

# What travels through RunInference: key (the face, its tf.Example, the answers so far by
# model name), value (the tf.Example to score, then the model's PredictionLog).
Scoring = tuple[Face, bytes, dict[str, list[float]]]


def keyed_example(face: Face) -> tuple[Scoring, bytes]:
    """The face keyed by itself, with the serialized raw tf.Example the `serving_examples`
    signature reads."""
    import tensorflow as tf  # in the worker

    feature = tf.train.Feature
    example = tf.train.Example(features=tf.train.Features(feature={
        FEATURE_PIXELS: feature(bytes_list=tf.train.BytesList(value=[face.pixels])),
        FEATURE_SOURCE: feature(bytes_list=tf.train.BytesList(value=[face.key.encode()])),
    })).SerializeToString()
    return (face, example, {}), example


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


def probabilities_of(log: Any) -> list[float]:
    import tensorflow as tf

    return tf.make_ndarray(log.predict_log.response.outputs[OUTPUT_PROBABILITIES]
                           ).reshape(-1).astype(float).tolist()


def logged(element: tuple[Scoring, Any], model: str) -> Any:
    """The PredictionLog, counted as it goes to the model's sink."""
    count(SCORED + model)
    return element[1]


def with_answer(element: tuple[Scoring, Any], model: str) -> tuple[Scoring, bytes]:
    """The model's probabilities added to the face's answers; the example goes on to the
    next model."""
    (face, example, answers), log = element
    return (face, example, {**answers, model: probabilities_of(log)}), example


def decide(element: tuple[Scoring, bytes], models: Sequence[ModelVersion], tolerance: float,
           keep_flagged_pixels: bool) -> Iterator[Any]:
    """One face with every model's answer -> its prediction record (the ensemble's
    decision); tagged `flagged` as well, with its pixels, when it goes to review and a
    review queue wants it."""
    (face, _, probabilities), _ = element
    decision = combine({m.name: probabilities[m.name] for m in models}, tolerance)
    record = {
        "key": face.key, "source": face.source, "row": face.row, "face": face.face,
        "box": face.box, "label": face.label, "usage": face.usage,
        "models": {m.name: {"version": m.version, "probabilities": probabilities[m.name]}
                   for m in models},
        "decision": asdict(decision),
    }
    yield record
    if keep_flagged_pixels and decision.needs_human_review:
        yield beam.pvalue.TaggedOutput(FLAGGED, {
            **record, "pixels_b64": base64.b64encode(face.pixels).decode()})


def _prediction_log_class():
    from tensorflow_serving.apis import prediction_log_pb2

    return prediction_log_pb2.PredictionLog


def score_faces(faces: Any, models: Sequence[ModelVersion], config: InferenceConfig,
                tolerance: float, keep_flagged_pixels: bool, logs_dir: str) -> Any:
    """Faces -> prediction records (main output) and, tagged `flagged`, the faces for the
    review queue; each model's PredictionLogs are written under `logs_dir/<model>/`."""
    scoring = faces | "ToExamples" >> beam.Map(keyed_example)
    for model in models:
        answered = scoring | f"Infer_{model.name}" >> RunInference(model_handler(model, config))
        (answered
         | f"Logs_{model.name}" >> beam.Map(logged, model.name)
         | f"WriteLogs_{model.name}" >> beam.io.WriteToTFRecord(
             fileio.join(logs_dir, model.name, "prediction_logs"),
             coder=beam.coders.ProtoCoder(_prediction_log_class()),
             file_name_suffix=".tfrecord", num_shards=config.num_shards,
             shard_name_template="-SSSSS-of-NNNNN"))
        scoring = answered | f"Answer_{model.name}" >> beam.Map(with_answer, model.name)
    return scoring | "Ensemble" >> beam.FlatMap(
        decide, list(models), tolerance, keep_flagged_pixels).with_outputs(FLAGGED,
                                                                           main="predictions")
