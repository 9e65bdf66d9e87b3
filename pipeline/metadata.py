"""Lineage in ML Metadata: every step execution, what it read, what it wrote.

Each execution is recorded with its input and output artifacts (URI + content fingerprint),
its parameters, cache key, code fingerprint, result (counts, metrics) and duration, and is
attributed to two contexts: the pipeline (all runs) and this run. The step cache asks this
store whether an execution with the same cache key already completed; `lineage()` walks
the events backwards from a pushed model version to the CSV it came from.

Type names are ours (`fer.<output name>`, `fer.step.<step>`); there is one artifact type per
kind of output, so the same query works for any registered model.

The store is SQLite (one file per run root) or a MySQL-protocol server shared by every run
(tested against MariaDB 10.11). A store that cannot be opened (server down, login refused)
is a `MetadataStoreError` with one line saying which and what to check, raised before the
run touches anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from fer_pipeline.core import fileio
from fer_pipeline.core import quiet
from fer_pipeline.core.artifacts import fingerprint
from fer_pipeline.core.config import MetadataConfig
from fer_pipeline.core.credentials import redact_text
from fer_pipeline.core.errors import UserError, ServerUnreachable

PIPELINE_CONTEXT = "fer.pipeline"
RUN_CONTEXT = "fer.pipeline_run"
DERIVED = "derived"    # artifacts a step's result describes (a blessing, a pushed version)
# How long opening a MySQL store may wait for the server: ml-metadata's own connect has no
# timeout (an unreachable host would hang for the kernel's TCP timeout, minutes).
MYSQL_CONNECT_TIMEOUT_S = 10.0


class MetadataStoreError(UserError, ValueError):
    """The configured ML Metadata store cannot be opened; the message says why."""


class MetadataStoreUnreachable(MetadataStoreError, ServerUnreachable):
    """The configured MySQL server does not answer or refuses connections."""


@dataclass
class ArtifactRecord:
    type_name: str                     # e.g. "model_run", "data", "blessing", "pushed_model"
    uri: str
    fingerprint: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


def _connection_config(config: MetadataConfig, run_root: str):
    from ml_metadata.proto import metadata_store_pb2

    connection = metadata_store_pb2.ConnectionConfig()
    if config.mysql_host:
        connection.mysql.host = config.mysql_host
        connection.mysql.port = config.mysql_port
        connection.mysql.database = config.mysql_database
        connection.mysql.user = config.mysql_user
        connection.mysql.password = os.environ.get(config.mysql_password_env, "")
        return connection, mysql_location(config)
    path = sqlite_path(config, run_root)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    connection.sqlite.filename_uri = path
    connection.sqlite.connection_mode = \
        metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return connection, path


def mysql_location(config: MetadataConfig) -> str:
    return f"mysql://{config.mysql_user}@{config.mysql_host}:{config.mysql_port}/" \
           f"{config.mysql_database}"


def uses_unix_socket(config: MetadataConfig) -> bool:
    """The MySQL client library reads host "localhost" as the default Unix socket, not TCP."""
    return config.mysql_host == "localhost"


def check_mysql_server(config: MetadataConfig,
                       timeout_s: float = MYSQL_CONNECT_TIMEOUT_S) -> None:
    """Raises MetadataStoreError unless a MySQL-protocol server greets us at host:port.

    ml-metadata reports a server that is down and a refused login alike, as
    "mysql_real_connect failed: errno: , error: " with no reason, and waits without a
    deadline; so before handing over we connect ourselves, within `timeout_s`, and read
    the server's first packet (its handshake, or an error packet such as "Host ... is not
    allowed to connect").
    """
    where = f"the MySQL metadata store at {config.mysql_host}:{config.mysql_port}"
    try:
        with socket.create_connection((config.mysql_host, config.mysql_port),
                                      timeout=timeout_s) as conn:
            greeting = conn.recv(4096)
    except socket.timeout:
        raise MetadataStoreUnreachable(f"{where} did not answer within {timeout_s:g} s "
                                       f"(metadata.mysql_host/mysql_port in --config)") from None
    except OSError as error:
        raise MetadataStoreUnreachable(f"cannot reach {where}: {error.strerror or error} (is the "
                                       f"server running? metadata.mysql_host/mysql_port in "
                                       f"--config)") from None
    # A MySQL packet: 3-byte length, 1-byte sequence number, then the payload, whose first
    # byte is 10 for a v10 handshake and 0xff for an error (2-byte code, then the message).
    payload = greeting[4:]
    if payload[:1] == b"\xff":
        message = payload[3:].decode("utf-8", "replace")
        raise MetadataStoreError(f"{where} refused the connection: {message}")
    if payload[:1] != b"\x0a":
        raise MetadataStoreError(f"{where} does not speak the MySQL protocol (its first "
                                 f"bytes: {greeting[:16]!r})")


def _open_error(config: MetadataConfig, location: str, error: RuntimeError
                ) -> MetadataStoreError:
    """ml-metadata's RuntimeError on connecting, as one line of ours (never the password,
    should the library quote its connection config)."""
    password = os.environ.get(config.mysql_password_env, "")
    text = redact_text(str(error).strip(), [f"--mysql_password={password}"] if password else [])
    if not config.mysql_host:
        return MetadataStoreError(f"cannot open the ML Metadata store {location}: {text}")
    if "mysql_real_connect failed" in text and uses_unix_socket(config):
        return MetadataStoreError(
            f"cannot log in to the MySQL metadata store on this machine's default Unix socket "
            f"(mysql_host 'localhost') as user {config.mysql_user!r}: no server listens "
            f"there, or the password in ${config.mysql_password_env} is wrong (set "
            f"mysql_host to 127.0.0.1 to use TCP)")
    if "mysql_real_connect failed" in text:
        # The server greeted us (check_mysql_server), so it is the login that failed.
        why = (f"${config.mysql_password_env} is not set (the password is read from it)"
               if not os.environ.get(config.mysql_password_env) else
               f"wrong password in ${config.mysql_password_env}, or the user may not "
               f"connect from this host")
        return MetadataStoreError(
            f"the MySQL metadata store at {config.mysql_host}:{config.mysql_port} refused "
            f"user {config.mysql_user!r}: {why}")
    # e.g. "Creating database X in ConnectImplmysql_query failed: errno: <reason>, error:
    # <reason>": the reason is what the server said.
    reason = text.rsplit("error: ", 1)[-1] or text
    return MetadataStoreError(f"cannot open {location}: {reason}")


def sqlite_path(config: MetadataConfig, run_root: str) -> str:
    if config.sqlite_path:
        return os.path.abspath(config.sqlite_path)
    if not fileio.is_uri(run_root):
        return os.path.join(os.path.abspath(run_root), "metadata.sqlite")
    key = hashlib.sha256(run_root.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "fer-pipeline", "metadata",
                        f"{key}.sqlite")


class MetadataStore:
    """A thin layer over ml_metadata's MetadataStore in our vocabulary."""

    def __init__(self, config: MetadataConfig, run_root: str, run_id: str = "") -> None:
        from ml_metadata.metadata_store import metadata_store

        connection, self.location = _connection_config(config, run_root)
        if config.mysql_host and not uses_unix_socket(config):
            check_mysql_server(config)
        try:
            with quiet.filtered_stderr(quiet.MLMD_CONNECT_NOISE):
                self._store = metadata_store.MetadataStore(connection)
        except RuntimeError as error:
            raise _open_error(config, self.location, error) from None
        self.pipeline_name = config.pipeline_name
        self.run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self._types: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ types and contexts

    def _type_id(self, kind: str, name: str) -> int:
        from ml_metadata.proto import metadata_store_pb2 as pb

        if (kind, name) not in self._types:
            proto = {"artifact": pb.ArtifactType, "execution": pb.ExecutionType,
                     "context": pb.ContextType}[kind](name=name)
            put = {"artifact": self._store.put_artifact_type,
                   "execution": self._store.put_execution_type,
                   "context": self._store.put_context_type}[kind]
            self._types[(kind, name)] = put(proto)
        return self._types[(kind, name)]

    def _context(self, type_name: str, name: str):
        from ml_metadata.proto import metadata_store_pb2 as pb

        existing = self._store.get_context_by_type_and_name(type_name, name)
        if existing is not None:
            return existing
        context = pb.Context(type_id=self._type_id("context", type_name), name=name)
        [context.id] = self._store.put_contexts([context])
        return context

    def contexts(self) -> list:
        return [self._context(PIPELINE_CONTEXT, self.pipeline_name),
                self._context(RUN_CONTEXT, f"{self.pipeline_name}/{self.run_id}")]

    # ------------------------------------------------------------------ writing

    def _artifact(self, record: ArtifactRecord):
        """The existing artifact with this URI, type and fingerprint, or a new one."""
        from ml_metadata.proto import metadata_store_pb2 as pb

        type_name = f"fer.{record.type_name}"
        type_id = self._type_id("artifact", type_name)
        for artifact in self._store.get_artifacts_by_uri(record.uri):
            if artifact.type_id == type_id and _get(artifact, "fingerprint") == \
                    record.fingerprint and _get(artifact, "properties") == \
                    _json(record.properties):
                return artifact
        artifact = pb.Artifact(type_id=type_id, uri=record.uri, state=pb.Artifact.LIVE)
        _set(artifact, "fingerprint", record.fingerprint)
        _set(artifact, "properties", _json(record.properties))
        return artifact

    def record_execution(self, step: str, inputs: dict[str, list[ArtifactRecord]],
                         outputs: dict[str, list[ArtifactRecord]],
                         properties: dict[str, Any]) -> int:
        """One completed execution with its input/output events, in one transaction."""
        from ml_metadata.proto import metadata_store_pb2 as pb

        execution = pb.Execution(type_id=self._type_id("execution", f"fer.step.{step}"),
                                 last_known_state=pb.Execution.COMPLETE)
        _set(execution, "step", step)
        for key, value in properties.items():
            _set(execution, key, value if isinstance(value, (str, int, float))
                 else _json(value))
        artifacts_and_events = []
        for kind, groups in ((pb.Event.INPUT, inputs), (pb.Event.OUTPUT, outputs)):
            for name, records in sorted(groups.items()):
                for index, record in enumerate(records):
                    event = pb.Event(type=kind)
                    event.path.steps.add().key = name
                    event.path.steps.add().index = index
                    artifacts_and_events.append((self._artifact(record), event))
        execution_id, _, _ = self._store.put_execution(
            execution, artifacts_and_events, self.contexts(), reuse_context_if_already_exist=True)
        return execution_id

    def record_job(self, step: str, inputs: dict[str, list[ArtifactRecord]],
                   output_kind: str, output_uri: str, result: Any, started: float,
                   execution_dir: str) -> int:
        """A job run outside the DAG (bulk inference, monitoring): its one output file
        and the job's result record, with how long it took since `started`."""
        outputs = {output_kind: [ArtifactRecord(output_kind, output_uri,
                                                fingerprint(output_uri))]}
        return self.record_execution(step, inputs, outputs, {
            "result": asdict(result), "duration_s": round(time.time() - started, 3),
            "execution_dir": execution_dir})

    # ------------------------------------------------------------------ reading

    def find_completed(self, step: str, cache_key: str) -> Optional[dict[str, Any]]:
        """The latest completed execution of `step` with this cache key, as a dict."""
        executions = [e for e in self._store.get_executions_by_type(f"fer.step.{step}")
                      if _get(e, "cache_key") == cache_key]
        if not executions:
            return None
        return self._describe(max(executions, key=lambda e: e.id))

    def _describe(self, execution) -> dict[str, Any]:
        events = self._store.get_events_by_execution_ids([execution.id])
        artifacts = {a.id: a for a in self._store.get_artifacts_by_id(
            [e.artifact_id for e in events])}
        types = {t.id: t.name for t in self._store.get_artifact_types()}
        described: dict[str, Any] = {
            "id": execution.id, "step": _get(execution, "step"),
            "properties": {k: _value(v) for k, v in execution.custom_properties.items()},
            "inputs": {}, "outputs": {}}
        for event in events:
            artifact = artifacts[event.artifact_id]
            side = "inputs" if event.type == event.INPUT else "outputs"
            described[side].setdefault(event.path.steps[0].key, []).append({
                "id": artifact.id, "type": types[artifact.type_id][len("fer."):],
                "uri": artifact.uri, "fingerprint": _get(artifact, "fingerprint"),
                "properties": json.loads(_get(artifact, "properties") or "{}")})
        return described

    def producer(self, artifact_id: int) -> Optional[dict[str, Any]]:
        events = [e for e in self._store.get_events_by_artifact_ids([artifact_id])
                  if e.type == e.OUTPUT]
        if not events:
            return None
        [execution] = self._store.get_executions_by_id([events[-1].execution_id])
        return self._describe(execution)

    def pushed_versions(self, model: Optional[str] = None) -> list[dict[str, Any]]:
        """Every pushed model version recorded, oldest first."""
        found = []
        for artifact in self._store.get_artifacts_by_type("fer.pushed_model"):
            props = json.loads(_get(artifact, "properties") or "{}")
            if model is None or props.get("model") == model:
                found.append({"id": artifact.id, "uri": artifact.uri, **props})
        return sorted(found, key=lambda a: a["id"])

    def run_contexts(self) -> list[str]:
        return [c.name for c in self._store.get_contexts_by_type(RUN_CONTEXT)]

    def executions_in_run(self, run_name: str) -> list[dict[str, Any]]:
        context = self._store.get_context_by_type_and_name(RUN_CONTEXT, run_name)
        if context is None:
            return []
        return [self._describe(e) for e in self._store.get_executions_by_context(context.id)]


def _json(value: Any) -> str:
    return json.dumps(fileio.to_jsonable(value), sort_keys=True)


def _set(message, key: str, value: Any) -> None:
    target = message.custom_properties[key]
    if isinstance(value, bool):
        target.int_value = int(value)
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    else:
        target.string_value = str(value)


def _value(value) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _get(message, key: str) -> Any:
    if key not in message.custom_properties:
        return None
    return _value(message.custom_properties[key])
