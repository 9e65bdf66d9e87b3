"""TF Serving's gRPC API (port 8500) over our ModelManager.

Implements tensorflow.serving.PredictionService (Predict, Classify, GetModelMetadata) and
tensorflow.serving.ModelService (GetModelStatus, HandleReloadConfigRequest) with the stubs
from tensorflow-serving-api, so TF Serving's own clients work unchanged. Client mistakes become gRPC status codes with a
message (NOT_FOUND, INVALID_ARGUMENT); the server keeps serving. A bug answers INTERNAL
"internal error (id ...)", the id next to the traceback in the server's log.

Overload: at most `max_concurrent_rpcs` calls are admitted at once, past that gRPC answers
RESOURCE_EXHAUSTED at once. A call's deadline travels with it: a request whose client has
given up (deadline passed while it waited for a thread or in the batch queue) is answered
DEADLINE_EXCEEDED without running the model.
"""
from __future__ import annotations

import logging
import time
import uuid
from concurrent import futures
from typing import Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from fer_pipeline.core.contract import class_names_for
from fer_pipeline.core.errors import ResourceError
from fer_pipeline.core.serving_root import specs_from_proto
from fer_pipeline.serving.reload_policy import ReloadPolicy
from fer_pipeline.serving.request_log import request_id
from fer_pipeline.serving.model_manager import (DEFAULT_SIGNATURE, STATE_CODES, LoadedVersion, Predictor,
                                   ServingError)
from fer_pipeline.serving.tensors import tensor_proto
from fer_pipeline.serving.thread_pool import started_thread_pool

log = logging.getLogger(__name__)

EXAMPLES_SIGNATURE = "serving_examples"  # the TFX convention for tf.Example input


def _abort(context: grpc.ServicerContext, error: ServingError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL), error.message)


def _requested(model_spec) -> tuple[str, Optional[int], Optional[str]]:
    version = model_spec.version.value if model_spec.HasField("version") else None
    return model_spec.name, version, (model_spec.version_label or None)


def deadline_of(context: grpc.ServicerContext) -> Optional[float]:
    """The call's deadline on time.monotonic()'s clock (None without one); an expired one
    ends the call here, before any work."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise ServingError("DEADLINE_EXCEEDED", "the call's deadline passed before it ran")
    return time.monotonic() + remaining


def _fill_spec(response_spec, model: LoadedVersion, signature_name: str) -> None:
    response_spec.name = model.name
    response_spec.version.value = model.version
    response_spec.signature_name = signature_name


def _guarded(method):
    """Turns ServingErrors (and stray exceptions) into gRPC status codes."""
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as error:
            _abort(context, error)
        except Exception:  # never leak a traceback (or its text) to the client; log it here
            error_id = uuid.uuid4().hex[:12]
            log.exception("gRPC %s failed (error id %s)", method.__name__, error_id)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")
    wrapper.__name__ = method.__name__
    return wrapper


def _request_id(context) -> str:
    """The client's x-request-id metadata, or one the server assigns (request_log.py)."""
    given = dict(context.invocation_metadata() or ()).get("x-request-id")
    return request_id(given if isinstance(given, str) else None)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @_guarded
    def Predict(self, request, context):
        deadline = deadline_of(context)
        name, version, label = _requested(request.model_spec)
        inputs = {}
        for key, proto in request.inputs.items():
            try:
                inputs[key] = tf.make_ndarray(proto)
            except Exception as error:
                raise ServingError("INVALID_ARGUMENT",
                                   f"input {key!r} is not a valid TensorProto: {error}")
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        model, outputs = self.predictor.predict(name, inputs, version, label, signature,
                                                list(request.output_filter), deadline)
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, model, signature)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tensor_proto(value))
        if self.predictor.request_log is not None:
            self.predictor.request_log.log_grpc("predict", request, response,
                                                _request_id(context))
        return response

    @_guarded
    def Classify(self, request, context):
        """Runs a tf.Example signature and reports each example's class scores (seven, or
        FER+'s eight)."""
        deadline = deadline_of(context)
        name, version, label = _requested(request.model_spec)
        examples = _serialized_examples(request.input)
        signature = request.model_spec.signature_name or EXAMPLES_SIGNATURE
        model = self.predictor.manager.resolve(name, version, label)
        specs = model.input_specs(signature)
        if len(specs) != 1 or next(iter(specs.values())).dtype != tf.string:
            raise ServingError("INVALID_ARGUMENT", f"signature {signature!r} does not take "
                                                   "serialized tf.Examples; use "
                                                   f"{EXAMPLES_SIGNATURE!r}")
        input_name = next(iter(specs))
        model, outputs = self.predictor.predict(
            name, {input_name: np.array(examples, dtype=object)}, model.version, None,
            signature, deadline=deadline)
        response = classification_pb2.ClassificationResponse()
        _fill_spec(response.model_spec, model, signature)
        # The model's own classes: FER-2013's seven, or FER+'s eight with contempt.
        names = class_names_for(np.shape(outputs["probabilities"])[-1])
        for row in outputs["probabilities"]:
            classifications = response.result.classifications.add()
            for class_name, score in zip(names, row):
                classifications.classes.add(label=class_name, score=float(score))
        if self.predictor.request_log is not None:
            self.predictor.request_log.log_grpc("classify", request, response,
                                                _request_id(context))
        return response

    @_guarded
    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            raise ServingError("INVALID_ARGUMENT", "metadata_field must be ['signature_def'], "
                                                   f"got {list(request.metadata_field)}")
        name, version, label = _requested(request.model_spec)
        model = self.predictor.manager.resolve(name, version, label)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, definition in model.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(definition)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_spec(response.model_spec, model, "")
        response.metadata["signature_def"].Pack(signature_map)
        return response


def _serialized_examples(model_input) -> list[bytes]:
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        examples = model_input.example_list.examples
    elif kind == "example_list_with_context":
        # Merging the context into each example is what TF Serving does.
        context = model_input.example_list_with_context.context
        examples = []
        for example in model_input.example_list_with_context.examples:
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        raise ServingError("INVALID_ARGUMENT", "Classify input has no examples")
    if not examples:
        raise ServingError("INVALID_ARGUMENT", "Classify input has no examples")
    return [example.SerializeToString() for example in examples]


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, predictor: Predictor,
                 reload_policy: Optional[ReloadPolicy] = None) -> None:
        self.manager = predictor.manager
        # Which reloads are allowed (serving/reload_policy.py); None: any.
        self.reload_policy = reload_policy

    @_guarded
    def GetModelStatus(self, request, context):
        name, version, label = _requested(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in self.manager.status(name, version, label):
            entry = response.model_version_status.add()
            entry.version = status.version
            entry.state = STATE_CODES[status.state]
            if status.error_code != "OK":
                entry.status.error_code = 2  # tensorflow.error.UNKNOWN
                entry.status.error_message = status.error_message
        return response

    @_guarded
    def HandleReloadConfigRequest(self, request, context):
        """Serves the given ModelServerConfig (TF Serving's runtime reconfiguration); returns
        once the new versions are loaded. Not written back to models.config."""
        if self.reload_policy is not None:
            self.reload_policy.check_enabled()
        try:
            specs = specs_from_proto(request.config)
        except ValueError as error:
            raise ServingError("INVALID_ARGUMENT", f"bad model server config: {error}")
        if self.reload_policy is not None:
            self.reload_policy.check(specs)   # before anything is loaded or created
        errors = self.manager.reload_config(specs)
        if errors:
            raise ServingError("UNKNOWN", "config applied, but loading failed: "
                                          + "; ".join(errors))
        log.info("config reloaded over gRPC: %s", [spec.name for spec in specs])
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0  # tensorflow.error.OK
        return response


def build_grpc_server(predictor: Predictor, host: str, port: int, max_request_bytes: int,
                      workers: int = 16, max_concurrent_rpcs: int = 0,
                      credentials: Optional[grpc.ServerCredentials] = None,
                      reload_policy: Optional[ReloadPolicy] = None
                      ) -> tuple[grpc.Server, int, futures.ThreadPoolExecutor]:
    """A started-later grpc.Server with both services; returns it, the bound port and its
    thread pool (grpc.Server.stop leaves the pool's threads running: shut it down after).
    max_concurrent_rpcs: calls admitted at once (0: twice `workers`), RESOURCE_EXHAUSTED
    past it; a few waiting for a thread keep the workers busy, a long queue would only
    add latency."""
    pool = started_thread_pool(workers, "grpc")
    server = grpc.server(
        pool,
        maximum_concurrent_rpcs=max_concurrent_rpcs or 2 * workers,
        options=[("grpc.max_receive_message_length", max_request_bytes),
                 ("grpc.max_send_message_length", max_request_bytes),
                 # gRPC sets SO_REUSEPORT by default: a second server on a busy port would
                 # bind "successfully" and share it. TF Serving fails there; so do we.
                 ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(predictor), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(predictor, reload_policy), server)
    # credentials: TLS (serving/tls.py), else plaintext as TF Serving's default.
    bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        pool.shutdown(wait=False)
        raise ResourceError(f"cannot bind gRPC to {host}:{port}")
    return server, bound, pool
