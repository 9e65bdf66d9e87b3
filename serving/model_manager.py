"""Loads the models listed in models.config and keeps them in step with the disk.

Like TF Serving's file-system source: every poll interval it re-reads models.config, lists
each model's base path, and works out which integer versions the version policy wants.
New versions are loaded *before* old ones are unloaded, and the served set is swapped in
one assignment, so requests never see a model with no version (zero failed requests while
a new version rolls out). A request that already holds the old version finishes on it.

A version with warm-up requests (`assets.extra/tf_serving_warmup_requests`, serving/warmup.py)
replays them after loading and before it becomes AVAILABLE, as TF Serving does; a warm-up
request that fails fails the load.

Errors that clients can cause are `ServingError`s carrying a code that REST and gRPC both
map to their own status (NOT_FOUND -> 404 / grpc NOT_FOUND, and so on).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from fer_pipeline.serving.input_contract import input_problem
from fer_pipeline.serving.tensors import eager_tensor
from fer_pipeline.core.serving_root import ConfigFileWatcher, ModelSpec, RequestLogSpec
from fer_pipeline.serving.warmup import replay_warmup

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"

# ModelVersionStatus.State values from tensorflow_serving/apis/get_model_status.proto.
STATE_CODES = {"UNKNOWN": 0, "START": 10, "LOADING": 20, "AVAILABLE": 30,
               "UNLOADING": 40, "END": 50}


class ServingError(Exception):
    """A request the server cannot satisfy. code: NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE,
    RESOURCE_EXHAUSTED, INTERNAL (the names grpc.StatusCode uses)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class VersionStatus:
    version: int
    state: str                      # a key of STATE_CODES
    error_code: str = "OK"
    error_message: str = ""


@dataclass
class LoadedVersion:
    """One version in memory: the loaded object, its concrete signatures and their protos."""
    name: str
    version: int
    path: str
    module: Any
    signatures: Mapping[str, Any]
    signature_defs: Mapping[str, Any]   # name -> tensorflow.SignatureDef proto

    def input_specs(self, signature_name: str) -> dict[str, tf.TensorSpec]:
        return dict(self.signature(signature_name).structured_input_signature[1])

    def signature(self, signature_name: str):
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise ServingError("INVALID_ARGUMENT",
                               f"Serving signature name: \"{name}\" not found in signature def "
                               f"of model {self.name} version {self.version}; available: "
                               f"{sorted(self.signatures)}")
        return self.signatures[name]

    def check_inputs(self, signature_name: str,
                     inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Input names, dtypes and shapes against the signature; returns them as arrays."""
        specs = self.input_specs(signature_name)
        arrays = {key: _checked_array(key, value, specs) for key, value in inputs.items()}
        missing = sorted(set(specs) - set(arrays))
        if missing:
            raise ServingError("INVALID_ARGUMENT",
                               f"missing input(s) {missing}; signature "
                               f"{signature_name or DEFAULT_SIGNATURE} expects {sorted(specs)}")
        return arrays

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls one signature on numpy inputs; checks names, dtypes and shapes first."""
        function = self.signature(signature_name)
        specs = self.input_specs(signature_name)
        tensors = {key: eager_tensor(array, specs[key].dtype)   # tf.constant leaks
                   for key, array in self.check_inputs(signature_name, inputs).items()}
        try:
            outputs = function(**tensors)
        except tf.errors.InvalidArgumentError as error:
            raise ServingError("INVALID_ARGUMENT", _graph_error(error.message)) from error
        except (ValueError, TypeError) as error:
            raise ServingError("INVALID_ARGUMENT", _first_line(str(error))) from error
        return {key: value.numpy() for key, value in outputs.items()}


def _graph_error(message: str) -> str:
    """The sentence that explains a graph error, without TF's preamble and node trailer."""
    skip = ("Graph execution error", "Detected at node", "<stack traces", "File ")
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(skip + ("[[",))]
    return useful[-1] if useful else _first_line(message)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid argument"


def _checked_array(key: str, value: np.ndarray,
                   specs: Mapping[str, tf.TensorSpec]) -> np.ndarray:
    if key not in specs:
        raise ServingError("INVALID_ARGUMENT",
                           f"unknown input {key!r}; expected {sorted(specs)}")
    array = np.asarray(value)
    problem = input_problem(key, array, specs[key])   # before TensorFlow sees it
    if problem:
        raise ServingError("INVALID_ARGUMENT", problem)
    return array


def list_versions(base_path: str) -> list[int]:
    """Integer-named subdirectories of base_path; hidden or non-integer names are ignored
    (that is where the pusher stages a version before renaming it into place)."""
    try:
        names = os.listdir(base_path)
    except FileNotFoundError:
        return []
    versions = []
    for name in names:
        if name.isdigit() and os.path.isdir(os.path.join(base_path, name)):
            versions.append(int(name))
    return sorted(versions)


def unservable_reason(spec: ModelSpec) -> str:
    """Why `spec` serves no version, in terms of its base path and version policy."""
    on_disk = list_versions(spec.base_path)
    if not os.path.isdir(spec.base_path):
        return f"its base_path {spec.base_path} does not exist"
    if not on_disk:
        return (f"its base_path {spec.base_path} holds no version directory (an integer "
                f"name such as {os.path.join(spec.base_path, '1')})")
    wanted = wanted_versions(spec, on_disk)
    if not wanted:
        return (f"its version policy 'specific' wants version(s) {sorted(spec.versions)}, "
                f"but {spec.base_path} holds {on_disk}")
    return (f"no version under {spec.base_path} could be loaded (versions {wanted}; see "
            "each version's status)")


def wanted_versions(spec: ModelSpec, on_disk: list[int]) -> list[int]:
    """The versions the version policy selects from what is on disk."""
    if spec.version_policy == "all":
        return list(on_disk)
    if spec.version_policy == "specific":
        return [v for v in on_disk if v in set(spec.versions)]
    return sorted(on_disk)[-spec.num_latest:]


def load_version(name: str, version: int, path: str) -> LoadedVersion:
    module = tf.saved_model.load(path)
    meta = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
        meta.ParseFromString(handle.read())
    defs = {key: value for key, value in meta.meta_graphs[0].signature_def.items()
            if not key.startswith("__")}  # __saved_model_init_op is not a signature
    return LoadedVersion(name, version, path, module, dict(module.signatures), defs)


@dataclass
class _ModelState:
    spec: ModelSpec
    served: dict[int, LoadedVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)


class ModelManager:
    """Serves the versions that models.config and the disk say; see the module docstring."""

    def __init__(self, config_path: str, poll_seconds: float = 1.0) -> None:
        self.config_path = config_path
        self.poll_seconds = poll_seconds
        self._models: dict[str, _ModelState] = {}
        self._lock = threading.Lock()          # guards _models; never held while loading
        self._sync_lock = threading.Lock()     # one sync at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._config = ConfigFileWatcher(config_path)
        self._specs: list[ModelSpec] = []     # the file's, or a ReloadConfig's until it changes

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Loads what is on disk now (so the server is ready when this returns), then polls."""
        self.sync()
        self._thread = threading.Thread(target=self._poll_loop, name="model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync()
            except Exception:  # a bad poll must not kill the poller; the next one retries
                log.exception("model poll failed")

    # --- syncing with disk -----------------------------------------------------------

    def _read_config(self) -> list[ModelSpec]:
        """Re-reads models.config when it changed; a broken file keeps the last good one."""
        specs, error = self._config.read()
        if error:
            log.error("keeping the previous model config: %s", error)
        if specs is not None:
            self._specs = specs
        return self._specs

    def sync(self) -> None:
        with self._sync_lock:
            self._serve(self._read_config())

    def reload_config(self, specs: list[ModelSpec]) -> list[str]:
        """ModelService.HandleReloadConfigRequest: serve `specs` now, as if models.config
        said so (models left out are unloaded). The file wins again once it changes on
        disk. Returns the load errors of the versions the new config wants."""
        with self._sync_lock:
            self._specs = list(specs)
            return self._serve(specs)

    def _serve(self, specs: list[ModelSpec]) -> list[str]:
        """Loads and unloads to match `specs`; the load errors of the versions they want."""
        errors = []
        for spec in specs:
            wanted = self._sync_model(spec)
            with self._lock:
                statuses = [self._models[spec.name].status.get(v) for v in wanted]
            errors += [f"{spec.name} version {status.version}: {status.error_message}"
                       for status in statuses if status and status.error_code != "OK"]
        self._drop_models_not_in(specs)
        return errors

    def _sync_model(self, spec: ModelSpec) -> list[int]:
        """Serves the versions `spec` wants of those on disk; returns those versions."""
        with self._lock:
            state = self._models.setdefault(spec.name, _ModelState(spec))
            state.spec = spec
            current = dict(state.served)
        wanted = wanted_versions(spec, list_versions(spec.base_path))
        new_served = {v: current[v] for v in wanted if v in current}
        for version in wanted:
            if version not in current:
                loaded = self._load(state, spec, version)
                if loaded is not None:
                    new_served[version] = loaded
        removed = sorted(set(current) - set(new_served))
        with self._lock:
            # The swap: one assignment, after every new version is ready.
            state.served = new_served
            for version in removed:
                state.status[version] = VersionStatus(version, "END")
        for version in removed:
            log.info("unloaded %s version %d", spec.name, version)
        return wanted

    def _load(self, state: _ModelState, spec: ModelSpec, version: int) -> Optional[LoadedVersion]:
        previous = state.status.get(version)
        if previous is not None and previous.error_code != "OK" and previous.state == "END":
            return None  # failed before; do not retry the same broken directory every second
        path = os.path.join(spec.base_path, str(version))
        with self._lock:
            state.status[version] = VersionStatus(version, "LOADING")
        try:
            loaded = load_version(spec.name, version, path)
            # As TF Serving: the version's warm-up requests run before it is AVAILABLE,
            # so its first real request does not pay for tracing the signatures.
            started = time.monotonic()
            replayed = replay_warmup(path, loaded.run)
            if replayed:
                log.info("warmed up %s version %d with %d requests in %.2f s", spec.name,
                         version, replayed, time.monotonic() - started)
        except Exception as error:  # any broken SavedModel: report it, keep serving the rest
            log.error("failed to load %s version %d from %s: %s", spec.name, version, path, error)
            with self._lock:
                state.status[version] = VersionStatus(version, "END", "UNKNOWN",
                                                      _first_line(str(error)))
            return None
        with self._lock:
            state.status[version] = VersionStatus(version, "AVAILABLE")
        log.info("loaded %s version %d", spec.name, version)
        return loaded

    def _drop_models_not_in(self, specs: list[ModelSpec]) -> None:
        names = {spec.name for spec in specs}
        with self._lock:
            for name in list(self._models):
                if name not in names:
                    del self._models[name]

    # --- lookups used by request handlers --------------------------------------------

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def request_log_spec(self, name: str) -> Optional[RequestLogSpec]:
        """What models.config's logging_config says for `name` now (None: no logging)."""
        with self._lock:
            state = self._models.get(name)
            return state.spec.request_log if state is not None else None

    def _state(self, name: str) -> _ModelState:
        state = self._models.get(name)
        if state is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name}); "
                                            f"known models: {sorted(self._models)}")
        return state

    def resolve(self, name: str, version: Optional[int] = None,
                label: Optional[str] = None) -> LoadedVersion:
        """The version a request asks for: explicit version, label, or the newest served."""
        with self._lock:
            state = self._state(name)
            version = _version_for_label(state, name, version, label)
            served, spec = dict(state.served), state.spec
        if version is None:
            if not served:  # the reason reads the disk: outside the lock
                raise ServingError("NOT_FOUND", f"Servable not found for request: "
                                                f"Latest({name}): no version is loaded; "
                                                f"{unservable_reason(spec)}")
            return served[max(served)]
        if version not in served:
            raise ServingError("NOT_FOUND", f"Servable not found for request: "
                                            f"Specific({name}, {version}); served: "
                                            f"{sorted(served)}")
        return served[version]

    def status(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None) -> list[VersionStatus]:
        """Like GetModelStatus: every version ever seen, or just the one asked for."""
        with self._lock:
            state = self._state(name)
            version = _version_for_label(state, name, version, label)
            statuses, spec = dict(state.status), state.spec
        if version is None:
            if not statuses:
                # As TF Serving: a model with no version at all is NOT_FOUND, not an empty
                # status list.
                raise ServingError("NOT_FOUND", f"Could not find any versions of model "
                                                f"{name}: {unservable_reason(spec)}")
            return [statuses[v] for v in sorted(statuses)]
        if version not in statuses:
            raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        return [statuses[version]]

    def unservable(self) -> dict[str, str]:
        """Each configured model that serves no version now, with the reason."""
        with self._lock:
            specs = [state.spec for state in self._models.values() if not state.served]
        return {spec.name: unservable_reason(spec) for spec in specs}


class Predictor:
    """What REST and gRPC share: find the version, run the signature (through the batcher
    when one is given), keep only the outputs asked for. REST and gRPC hand what they
    answered to `request_log` (fer_pipeline.serving.request_log.RequestLogger, or None)."""

    def __init__(self, manager: ModelManager, batcher: Any = None,
                 request_log: Any = None) -> None:
        self.manager = manager
        self.batcher = batcher   # fer_pipeline.serving.batching.Batcher or None
        self.request_log = request_log

    def predict(self, name: str, inputs: Mapping[str, np.ndarray],
                version: Optional[int] = None, label: Optional[str] = None,
                signature_name: str = "",
                output_filter: Optional[list[str]] = None,
                deadline: Optional[float] = None
                ) -> tuple[LoadedVersion, dict[str, np.ndarray]]:
        model = self.manager.resolve(name, version, label)
        return model, self.run(model, inputs, signature_name, output_filter, deadline)

    def run(self, model: LoadedVersion, inputs: Mapping[str, np.ndarray],
            signature_name: str = "",
            output_filter: Optional[list[str]] = None,
            deadline: Optional[float] = None) -> dict[str, np.ndarray]:
        """Runs an already resolved version (it stays usable even if unloaded meanwhile).
        deadline (time.monotonic()): past it the model is not run (DEADLINE_EXCEEDED)."""
        signature = signature_name or DEFAULT_SIGNATURE
        if not inputs:
            raise ServingError("INVALID_ARGUMENT", "the request has no inputs")
        if self.batcher is not None:
            # Checked here, alone: a bad request must not fail the whole batch it would join.
            outputs = self.batcher.run(model, signature, model.check_inputs(signature, inputs),
                                       deadline)
        else:
            check_deadline(deadline)
            outputs = model.run(signature, inputs)
        if output_filter:
            unknown = sorted(set(output_filter) - set(outputs))
            if unknown:
                raise ServingError("INVALID_ARGUMENT",
                                   f"output_filter names unknown output(s) {unknown}; "
                                   f"outputs are {sorted(outputs)}")
            outputs = {key: outputs[key] for key in output_filter}
        return outputs


def check_deadline(deadline: Optional[float]) -> None:
    """DEADLINE_EXCEEDED when the caller's deadline (time.monotonic()) has passed: its
    client has stopped waiting, so the work would be wasted."""
    if deadline is not None and time.monotonic() >= deadline:
        raise ServingError("DEADLINE_EXCEEDED", "the call's deadline passed before its "
                                                "model ran")


def _version_for_label(state: "_ModelState", name: str, version: Optional[int],
                       label: Optional[str]) -> Optional[int]:
    """The version a label stands for (models.config version_labels), else `version`."""
    if not label:
        return version
    if label not in state.spec.labels:
        raise ServingError("NOT_FOUND", f"Unrecognized servable version label: "
                                        f"{label} for model {name}")
    return state.spec.labels[label]
