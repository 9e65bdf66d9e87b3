"""Reads and writes `models.config`, TF Serving's text-format `ModelServerConfig`.

The pusher writes this file next to the versioned model directories; the real
`tensorflow_model_server` (via Docker) and our embedded server (`serving/server.py`) both
read it. Keeping one reader/writer here means both sides agree on the format. The file may
live on a local disk or an object store (s3://, gs://): reads and writes go through
`fer_pipeline.core.fileio`.
"""
from __future__ import annotations

import os
import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from fer_pipeline.core import fileio
from fer_pipeline.core.contract import MODELS_CONFIG
from fer_pipeline.core.errors import ConfigError

VERSION_POLICIES = ("latest", "specific", "all")
# logging_config's log_collector_config.type that fer-serve writes (serving/request_log.py):
# TFRecord files of PredictionLogs under filename_prefix.
REQUEST_LOG_COLLECTOR = "tfrecord"

# Where the serving root is mounted inside the TF Serving container, and the ports it uses.
CONTAINER_MODELS_DIR = "/models"
GRPC_PORT = 8500
REST_PORT = 8501
# What TF Serving's S3 filesystem reads from its environment; passed through by name (the
# values stay in the caller's environment, never in a printed command).
S3_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "S3_ENDPOINT",
               "S3_USE_HTTPS", "S3_VERIFY_SSL")


@dataclass(frozen=True)
class RequestLogSpec:
    """A model's logging_config: log a `sampling_rate` share of its requests to TFRecord
    files named `<filename_prefix>-...` (serving/request_log.py).

    Only fer-serve reads it: the released tensorflow_model_server refuses to start with a
    logging_config, so the configs written for it leave it out (see components/pusher.py).
    """
    filename_prefix: str
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.filename_prefix:
            raise ConfigError("logging_config needs log_collector_config.filename_prefix")
        if not 0.0 <= self.sampling_rate <= 1.0:
            raise ConfigError(f"logging_config sampling_rate must be within [0, 1], got "
                              f"{self.sampling_rate}")


@dataclass
class ModelSpec:
    """One model entry of models.config.

    version_policy: "latest" (serve the `num_latest` highest versions), "specific" (serve
    exactly `versions`) or "all". labels maps a label such as "stable" to a version number.
    """
    name: str
    base_path: str
    version_policy: str = "latest"
    num_latest: int = 1
    versions: list[int] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    request_log: Optional[RequestLogSpec] = None

    def __post_init__(self) -> None:
        if self.version_policy not in VERSION_POLICIES:
            raise ConfigError(f"model {self.name!r}: unknown version_policy "
                              f"{self.version_policy!r}; choose from {VERSION_POLICIES}")
        if self.version_policy == "latest" and self.num_latest < 1:
            raise ConfigError(f"model {self.name!r}: num_latest must be >= 1")
        if self.version_policy == "specific" and not self.versions:
            raise ConfigError(f"model {self.name!r}: version_policy 'specific' needs versions")


def _to_proto(specs: Iterable[ModelSpec]) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    for spec in specs:
        entry = config.model_config_list.config.add()
        entry.name = spec.name
        entry.base_path = spec.base_path
        entry.model_platform = "tensorflow"
        policy = entry.model_version_policy
        if spec.version_policy == "latest":
            policy.latest.num_versions = spec.num_latest
        elif spec.version_policy == "specific":
            policy.specific.versions.extend(int(v) for v in spec.versions)
        else:
            policy.all.SetInParent()  # an empty message still has to be marked present
        for label, version in sorted(spec.labels.items()):
            entry.version_labels[label] = int(version)
        if spec.request_log is not None:
            logging_config = entry.logging_config
            logging_config.log_collector_config.type = REQUEST_LOG_COLLECTOR
            logging_config.log_collector_config.filename_prefix = spec.request_log.filename_prefix
            logging_config.sampling_config.sampling_rate = spec.request_log.sampling_rate
    return config


def _request_log(entry) -> Optional[RequestLogSpec]:
    if not entry.HasField("logging_config"):
        return None
    collector = entry.logging_config.log_collector_config
    if collector.type != REQUEST_LOG_COLLECTOR:
        raise ConfigError(f"model {entry.name!r}: logging_config log_collector_config type "
                          f"{collector.type!r} is not supported; fer-serve writes "
                          f"{REQUEST_LOG_COLLECTOR!r}")
    try:
        return RequestLogSpec(collector.filename_prefix,
                              entry.logging_config.sampling_config.sampling_rate)
    except ValueError as error:
        raise ConfigError(f"model {entry.name!r}: {error}") from None


def _from_proto(config: model_server_config_pb2.ModelServerConfig) -> list[ModelSpec]:
    specs = []
    for entry in config.model_config_list.config:
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        # TF Serving's default when no policy is given is "latest 1".
        spec = ModelSpec(
            name=entry.name,
            base_path=entry.base_path,
            version_policy=kind or "latest",
            num_latest=(policy.latest.num_versions or 1) if kind == "latest" else 1,
            versions=list(policy.specific.versions) if kind == "specific" else [],
            labels={k: int(v) for k, v in entry.version_labels.items()},
            request_log=_request_log(entry),
        )
        specs.append(spec)
    return specs


def specs_from_proto(config: model_server_config_pb2.ModelServerConfig) -> list[ModelSpec]:
    """The models of a ModelServerConfig message (HandleReloadConfigRequest's payload);
    ValueError for what this server cannot serve."""
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError("only a model_config_list is supported (custom_model_config is not)")
    specs = _from_proto(config)
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"model name(s) {duplicates} appear more than once")
    if any(not spec.name or not spec.base_path for spec in specs):
        raise ConfigError("every model needs a name and a base_path")
    return specs


def write_model_server_config(path: str, specs: Iterable[ModelSpec]) -> str:
    """Writes `specs` to `path` whole and returns the path.

    A polling server may read the file at any moment; it must see either the old or the
    new config, never half of one. Locally the text goes to a temp file renamed over the
    target; on an object store the object is replaced in one upload, and an object only
    becomes visible once its upload completed (fer_pipeline.core.fileio.write_text does both).
    """
    text = text_format.MessageToString(_to_proto(specs))
    fileio.write_text(path, text)
    return str(path)


def read_model_server_config(path: str) -> list[ModelSpec]:
    """Parses a text-format ModelServerConfig; raises ValueError with the file name if bad."""
    text = fileio.read_text(path)
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"{path}: not a text-format ModelServerConfig: {error}") from error
    return _from_proto(config)


class ConfigFileWatcher:
    """models.config as a polling reader sees it: parsed again only when the file changed,
    and a bad edit keeps the last good specs (a server must not drop its models because
    someone saved a half-written file).

    `specs` is the last good parse. The first read has nothing to keep, so its OSError or
    ValueError propagates.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.specs: Optional[list[ModelSpec]] = None
        self._stamp: object = None
        self._error = ""

    def _current_stamp(self) -> object:
        # fileio offers no mtime on an object store: there every poll reads the file again.
        return (time.monotonic_ns() if fileio.is_uri(self.path)
                else os.stat(self.path).st_mtime_ns)

    def read(self) -> tuple[Optional[list[ModelSpec]], str]:
        """(the new specs, "") when the file changed and parses; (None, a one-line error)
        the first time a read fails that way (a poller logs each problem once, not every
        poll); (None, "") otherwise."""
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return None, ""
            specs = read_model_server_config(self.path)
        except (OSError, ValueError) as error:
            if self.specs is None:
                raise
            line = " ".join(str(error).split())
            new, self._error = line != self._error, line
            return None, line if new else ""
        self._stamp, self.specs, self._error = stamp, specs, ""
        return specs, ""


def container_config(specs: Iterable[ModelSpec], serving_root: str) -> list[ModelSpec]:
    """The same specs with base paths under `serving_root` rewritten to /models/...

    The config the pusher writes holds host paths; inside the container the serving root is
    mounted at /models, so the container needs its own copy with rewritten paths. The copy
    has no logging_config: the released TF Serving refuses to start with one.
    """
    root = os.path.abspath(serving_root)
    rewritten = []
    for spec in specs:
        # A URI is read by TF Serving itself and means the same inside the container.
        base = spec.base_path if fileio.is_uri(spec.base_path) else os.path.abspath(
            spec.base_path)
        if not fileio.is_uri(base) and (base == root or base.startswith(root + os.sep)):
            base = CONTAINER_MODELS_DIR + base[len(root):].replace(os.sep, "/")
        rewritten.append(replace(without_request_log(spec), base_path=base))
    return rewritten


def without_request_log(spec: ModelSpec) -> ModelSpec:
    """The spec as the released tensorflow_model_server accepts it: no logging_config."""
    return replace(spec, versions=list(spec.versions), labels=dict(spec.labels),
                   request_log=None)


def docker_command(config_path: str, serving_root: str, poll_seconds: int = 1) -> str:
    """The command line that serves `serving_root` with the real TF Serving.

    Uses the `tensorflow_model_server` binary when it is on PATH, else the official Docker
    image with the serving root mounted at /models. For Docker, `config_path` must lie inside
    `serving_root` and its base paths must be container paths (see `container_config`).
    A serving root on an object store is read by TF Serving directly: nothing is mounted,
    and the S3 settings are passed through from the caller's environment.

    `--model_config_file_poll_wait_seconds` makes TF Serving re-read models.config, which
    is how a push to an object store becomes visible (see components/pusher.py).
    """
    poll = f"--model_config_file_poll_wait_seconds={poll_seconds}"
    fs_poll = "--file_system_poll_wait_seconds=1"
    config = config_path if fileio.is_uri(config_path) else os.path.abspath(config_path)
    binary = shutil.which("tensorflow_model_server")
    if binary:
        return shlex.join([binary, f"--port={GRPC_PORT}", f"--rest_api_port={REST_PORT}",
                           f"--model_config_file={config}", poll, fs_poll])
    ports = ["-p", f"{GRPC_PORT}:{GRPC_PORT}", "-p", f"{REST_PORT}:{REST_PORT}"]
    if fileio.is_uri(serving_root):
        env = [arg for name in S3_ENV_VARS for arg in ("-e", name)]
        return shlex.join(["docker", "run", "--rm", *ports, *env, "tensorflow/serving",
                           f"--model_config_file={config}", poll, fs_poll])
    root = os.path.abspath(serving_root)
    relative = os.path.relpath(os.path.abspath(config_path), root)
    if relative.startswith(".."):
        raise ConfigError(f"{config_path} is not inside the serving root {serving_root}; "
                          "the container only sees the mounted directory")
    return shlex.join([
        "docker", "run", "--rm", *ports, "-v", f"{root}:{CONTAINER_MODELS_DIR}",
        "tensorflow/serving", f"--model_config_file={CONTAINER_MODELS_DIR}/{relative}", poll,
        fs_poll,
    ])


# ----------------------------------------------------------------------------- what is served
# The layout queries: which versions of a model TF Serving loads from a serving root.

def version_dirs(serving_root: str, name: str) -> list[int]:
    """Every integer-named directory of `name`, complete or not, ascending."""
    model_root = fileio.join(serving_root, name)
    if not fileio.isdir(model_root):
        return []
    return sorted(int(entry) for entry in fileio.listdir(model_root)
                  if entry.isdigit() and fileio.isdir(fileio.join(model_root, entry)))


def configured_models(serving_root: str) -> Optional[dict[str, ModelSpec]]:
    path = fileio.join(serving_root, MODELS_CONFIG)
    if not fileio.exists(path):
        return None
    return {spec.name: spec for spec in read_model_server_config(path)}


def _selected(spec: ModelSpec, on_disk: list[int]) -> list[int]:
    """The versions of `on_disk` that `spec`'s version policy makes TF Serving load."""
    if spec.version_policy == "specific":
        return sorted(set(spec.versions) & set(on_disk))
    if spec.version_policy == "all":
        return list(on_disk)
    return on_disk[-spec.num_latest:]


def served_versions(serving_root: str, name: str) -> list[int]:
    """The versions of `name` that TF Serving serves from `serving_root`, ascending.

    What models.config names when it exists. Without one: on a local root every integer
    directory (a rename published each, so each is complete); on an object store none,
    since this pusher writes models.config after every upload and an integer prefix no
    config names may be a crashed upload.
    """
    specs = configured_models(serving_root)
    if specs is None:
        return [] if fileio.is_uri(serving_root) else version_dirs(serving_root, name)
    if name not in specs:
        return []
    return _selected(specs[name], version_dirs(serving_root, name))


def latest_served_version(serving_root: str, name: str) -> Optional[tuple[int, str]]:
    """(version, path) of the highest version of `name` in serving, or None."""
    versions = served_versions(serving_root, name)
    if not versions:
        return None
    return versions[-1], fileio.join(serving_root, name, str(versions[-1]))


def model_names_on_disk(serving_root: str) -> list[str]:
    if not fileio.isdir(serving_root):
        return []
    return sorted(entry for entry in fileio.listdir(serving_root)
                  if not entry.startswith(".") and version_dirs(serving_root, entry))
