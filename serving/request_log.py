"""Request logs: a sampled `PredictionLog` per request, written by a background writer.

What TF Serving's `logging_config` asks for, which the released tensorflow_model_server
cannot do (it refuses to start with one: "No request-logger-creator provided"). Per model,
models.config's `logging_config` (parsed in core/serving_root.py) names a
`filename_prefix` and a `sampling_rate`; for each successful request that is sampled, the
request handler (gRPC Predict/Classify, REST :predict) hands this module the request and
the response, and returns. Everything else happens on one writer thread:

* The request path only draws the sample and puts one item on a queue bounded in records
  and in bytes (`put_nowait`; serving/request_log_bounds.py). When the queue is full the
  record is dropped and counted
  (`fer_serve_request_log_dropped_total` in /monitoring/prometheus/metrics): logging never
  blocks or fails a request. REST requests are turned into PredictRequest/PredictResponse
  protos on the writer thread, not on the request path.
* The writer appends each record to the open file of its prefix as a TFRecord and flushes
  after every batch it took from the queue (at most `FLUSH_EVERY` records), so a killed
  server loses at most what was still queued, and its open file reads up to its last
  complete record.
* Files rotate by size (`max_file_bytes`) and by age (`max_file_seconds`, also when no
  request comes). A file is written under `<name>.tfrecord.partial` and renamed to
  `<name>.tfrecord` when it is closed, so a `.tfrecord` file is always whole.
* Each log directory stays within `max_total_bytes` and `max_age_s`: the oldest closed
  files are deleted first, and counted (serving/request_log_bounds.py).

File names: `<filename_prefix>-<UTC start, %Y%m%dT%H%M%S.%fZ>-<pid>-<sequence>.tfrecord`,
e.g. `request_logs/cnn/requests-20261130T071502.123456Z-4242-00003.tfrecord`: sorting
the names of one server sorts its files by start time; the pid keeps two servers writing
to one prefix apart. A `.partial` file whose server is gone is the last file of a killed
server.

Every record is a `tensorflow.serving.PredictionLog`: `log_metadata` (model_spec with the
version that answered and its signature, sampling_config, timestamp_secs) and
`predict_log` {request, response} or `classify_log` {request, response}, the format TF
Serving's own request logger writes. `read_logs` reads them back (with
`tf.data.TFRecordDataset`).

Each record also carries the request's id, in `log_metadata.request_origin`: the client's
(gRPC metadata `x-request-id`, HTTP header `X-Request-Id`; the ensemble client sends one
id with each model's request for the same faces) or, without one, a uuid4 the server
assigns (`request_id`). The monitor joins the models' answers to one request by it
(components/monitor/join.py). Why that field: TF Serving's LogMetadata has no request-id
field, and `request_origin` is a plain string of the standard proto, so every TF Serving
tool still reads the logs; the request itself stays exactly what the client sent (an id
added as an input or an Example feature would change what a replay of the log sends).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, prediction_log_pb2

from fer_pipeline.core.errors import ConfigError, InputDataError, MissingInputError
from fer_pipeline.core.serving_root import RequestLogSpec
from fer_pipeline.serving.tensors import tensor_proto
from fer_pipeline.serving.request_log_bounds import LogRetention, QueueBytes, arrays_bytes

log = logging.getLogger(__name__)

LOG_SUFFIX = ".tfrecord"
OPEN_SUFFIX = ".tfrecord.partial"      # the file a writer still appends to
FLUSH_EVERY = 64                       # records written between two flushes, at most
TFRECORD_FRAMING_BYTES = 16            # length, its CRC and the data's CRC around each record
REQUEST_ID_HEADER = "X-Request-Id"     # the HTTP header; gRPC metadata: x-request-id
MAX_REQUEST_ID_CHARS = 128             # a longer client id is cut (it is logged per record)


@dataclass
class RequestLogConfig:
    """How the writer writes (the server's settings; what to log comes from models.config)."""
    max_file_bytes: int = 64 * 1024 * 1024
    max_file_seconds: float = 600.0
    queue_records: int = 4096          # records waiting for the writer; more are dropped
    queue_bytes: int = 64 * 1024 * 1024     # ... and their bytes (serving/request_log_bounds.py)
    max_total_bytes: int = 8 * 1024 ** 3    # per log directory; oldest files deleted (0: no limit)
    max_age_s: float = 30 * 24 * 3600.0     # files older are deleted (0: kept however old)

    def __post_init__(self) -> None:
        if (self.max_file_bytes < 1 or self.max_file_seconds <= 0 or self.queue_records < 1
                or self.queue_bytes < 1):
            raise ConfigError("request log: max_file_bytes, max_file_seconds, queue_records "
                              "and queue_bytes must be positive")
        if self.max_total_bytes < 0 or self.max_age_s < 0:
            raise ConfigError("request log: max_total_bytes and max_age_s must be 0 (no "
                              "limit) or positive")


@dataclass
class RequestLogCounts:
    """Per model: records written, dropped because the queue was full, failed to write."""
    written: int = 0
    dropped: int = 0
    failed: int = 0


# --- reading -------------------------------------------------------------------------------

def log_files(paths: Union[str, Iterable[str]]) -> list[str]:
    """The log files among `paths`: files as given, directories searched recursively for
    closed (`.tfrecord`) and open (`.tfrecord.partial`) files, sorted by name."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[str] = []
    for path in map(str, paths):
        if not tf.io.gfile.isdir(path):
            if not tf.io.gfile.exists(path):
                raise MissingInputError(f"no request log at {path}")
            found.append(path)
            continue
        for directory, _, names in tf.io.gfile.walk(path):
            found += [os.path.join(directory, name) for name in sorted(names)
                      if name.endswith((LOG_SUFFIX, OPEN_SUFFIX))]
    return sorted(found)


def read_logs(paths: Union[str, Iterable[str]]) -> Iterator[prediction_log_pb2.PredictionLog]:
    """Every PredictionLog in the log files or directories `paths` (see `log_files`).

    An open (`.partial`) file, or one a killed server left, ends at its last complete
    record; a truncated closed file is an error (ValueError naming the file).
    """
    for path in log_files(paths):
        records = iter(tf.data.TFRecordDataset(path))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except tf.errors.DataLossError as error:
                if path.endswith(OPEN_SUFFIX):
                    break  # the record a writer had not finished: the file ends before it
                raise InputDataError(f"{path}: corrupt request log: {error.message}") from error
            yield prediction_log_pb2.PredictionLog.FromString(record.numpy())


# --- writing -------------------------------------------------------------------------------

def _file_stem(prefix: str, sequence: int) -> str:
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{prefix}-{started}-{os.getpid()}-{sequence:05d}"


class _OpenFile:
    """The file one filename_prefix appends to now."""

    def __init__(self, prefix: str, sequence: int) -> None:
        directory = os.path.dirname(prefix)
        if directory:
            os.makedirs(directory, exist_ok=True)
        stem = _file_stem(prefix, sequence)
        self.final_path = stem + LOG_SUFFIX
        self.open_path = stem + OPEN_SUFFIX
        self.writer = tf.io.TFRecordWriter(self.open_path)
        self.opened = time.monotonic()
        self.bytes = 0

    def write(self, record: bytes) -> None:
        self.writer.write(record)
        self.bytes += len(record) + TFRECORD_FRAMING_BYTES

    def close(self) -> str:
        self.writer.close()
        os.replace(self.open_path, self.final_path)
        return self.final_path


# One queued record: (model name, its logging spec, a function building the PredictionLog,
# the bytes it holds in the queue).
_Item = tuple[str, RequestLogSpec, Callable[[], prediction_log_pb2.PredictionLog], int]
_STOP = None


class RequestLogger:
    """Samples requests and writes PredictionLogs on a background thread; see the module doc.

    `spec_for(model_name)` says whether and how a model logs (None: it does not); it is
    asked on every request, so a models.config change applies to the next request.
    """

    def __init__(self, spec_for: Callable[[str], Optional[RequestLogSpec]],
                 config: Optional[RequestLogConfig] = None, seed: Optional[int] = None) -> None:
        self.config = config or RequestLogConfig()
        self._spec_for = spec_for
        self._random = random.Random(seed)
        self._queue: "queue.Queue[Optional[_Item]]" = queue.Queue(self.config.queue_records)
        self._queue_bytes = QueueBytes(self.config.queue_bytes)
        self._retention = LogRetention(LOG_SUFFIX, OPEN_SUFFIX, self.config.max_total_bytes,
                                       self.config.max_age_s)
        self._directories: set[str] = set()          # every directory the writer wrote to
        self._counts: dict[str, RequestLogCounts] = {}
        self._counts_lock = threading.Lock()
        self._files: dict[str, _OpenFile] = {}       # filename_prefix -> open file
        self._sequence = 0
        self._reported_errors: set[str] = set()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "RequestLogger":
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Writes what is queued, closes (and renames) the open files."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        try:
            self._queue.put(_STOP, timeout=timeout)   # waits only for the writer to make room
        except queue.Full:
            log.error("request log writer did not drain its queue; records still queued "
                      "are lost")
            return
        self._thread.join(timeout)

    # --- the request path ------------------------------------------------------------

    def log_grpc(self, kind: str, request, response, request_id: str = "") -> None:
        """A gRPC Predict ("predict") or Classify ("classify") that succeeded. The model
        spec (with the version that answered) comes from the response."""
        spec = self._sampled(response.model_spec.name)
        if spec is None:
            return
        timestamp = int(time.time())

        def build() -> prediction_log_pb2.PredictionLog:
            record = _with_metadata(response.model_spec, spec, timestamp, request_id)
            entry = record.predict_log if kind == "predict" else record.classify_log
            entry.request.CopyFrom(request)
            entry.response.CopyFrom(response)
            return record
        self._offer(response.model_spec.name, spec, build,
                    request.ByteSize() + response.ByteSize())

    def log_arrays(self, name: str, version: int, signature: str,
                   inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                   request_id: str = "") -> None:
        """A predict that arrived as arrays (REST): logged as the PredictRequest and
        PredictResponse TF Serving would have made of it."""
        spec = self._sampled(name)
        if spec is None:
            return
        timestamp = int(time.time())

        def build() -> prediction_log_pb2.PredictionLog:
            model_spec, request, response = predict_protos(name, version, signature, inputs,
                                                           outputs)
            record = _with_metadata(model_spec, spec, timestamp, request_id)
            record.predict_log.request.CopyFrom(request)
            record.predict_log.response.CopyFrom(response)
            return record
        self._offer(name, spec, build, arrays_bytes(inputs, outputs))

    def log_forwarded(self, name: str, kind: str,
                      build: Callable[[], tuple[model_pb2.ModelSpec, Any, Any]], size: int,
                      request_id: str = "") -> None:
        """A request the logging proxy (serving/proxy.py) forwarded and its upstream
        answered. `kind`: predict, classify, regress or multi_inference; `build` runs on
        the writer thread (so parsing and converting cost the request nothing) and returns
        the model spec that answered, the request and the response as protos."""
        spec = self._sampled(name)
        if spec is None:
            return
        timestamp = int(time.time())

        def record() -> prediction_log_pb2.PredictionLog:
            model_spec, request, response = build()
            out = _with_metadata(model_spec, spec, timestamp, request_id)
            entry = getattr(out, f"{kind}_log")
            entry.request.CopyFrom(request)
            entry.response.CopyFrom(response)
            return out
        self._offer(name, spec, record, size)

    def _sampled(self, name: str) -> Optional[RequestLogSpec]:
        spec = self._spec_for(name)
        if spec is None or self._random.random() >= spec.sampling_rate:
            return None
        return spec

    def _offer(self, name: str, spec: RequestLogSpec,
               build: Callable[[], prediction_log_pb2.PredictionLog], size: int) -> None:
        if not self._stopping and self._queue_bytes.take(size):
            try:
                self._queue.put_nowait((name, spec, build, size))
                return
            except queue.Full:
                self._queue_bytes.give_back(size)
        self._count(name, "dropped")

    # --- counters --------------------------------------------------------------------

    def _count(self, name: str, field: str) -> None:
        with self._counts_lock:
            counts = self._counts.setdefault(name, RequestLogCounts())
            setattr(counts, field, getattr(counts, field) + 1)

    def counts(self) -> dict[str, RequestLogCounts]:
        with self._counts_lock:
            return {name: RequestLogCounts(c.written, c.dropped, c.failed)
                    for name, c in self._counts.items()}

    def queued(self) -> int:
        return self._queue.qsize()

    def prometheus_lines(self) -> list[str]:
        """The counters in Prometheus' text format (rest.py serves them)."""
        lines = ["# HELP fer_serve_request_log_queue_records Records waiting for the writer.",
                 "# TYPE fer_serve_request_log_queue_records gauge",
                 f"fer_serve_request_log_queue_records {self.queued()}",
                 "# HELP fer_serve_request_log_queue_bytes Bytes of the records waiting.",
                 "# TYPE fer_serve_request_log_queue_bytes gauge",
                 f"fer_serve_request_log_queue_bytes {self._queue_bytes.queued}"]
        per_model = sorted(self.counts().items())
        for field, help_text in (
                ("written", "Sampled requests written to the request log."),
                ("dropped", "Sampled requests not logged because the log queue was full "
                            "(in records or bytes)."),
                ("failed", "Sampled requests whose log record could not be written.")):
            metric = f"fer_serve_request_log_{field}_total"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{model_name="{name}"}} {getattr(counts, field)}'
                      for name, counts in per_model]
        return lines + self._retention.prometheus_lines()

    # --- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = self._take_batch()
            stopping = _STOP in batch
            try:
                self._write_batch([item for item in batch if item is not _STOP])
            except Exception:  # a writer that died would silently drop every later record
                log.exception("request log writer")
        self._close_files(older_than=0.0)

    def _write_batch(self, batch: list[_Item]) -> None:
        """Appends the batch, flushes each file it went to, rotates files that are due."""
        written_to = {self._write(item) for item in batch}
        for prefix in written_to - {None}:
            if prefix in self._files:
                self._files[prefix].writer.flush()
        self._close_files(older_than=self.config.max_file_seconds)
        self._retention.prune(self._directories)   # at most once a second

    def _take_batch(self) -> list[Optional[_Item]]:
        """Waits for one item (or until the oldest open file is due to rotate), then takes
        what else is already queued, up to FLUSH_EVERY."""
        if self._files:
            oldest = min(f.opened for f in self._files.values())
            timeout = max(0.01, oldest + self.config.max_file_seconds - time.monotonic())
        else:
            timeout = 1.0
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < FLUSH_EVERY and batch[-1] is not _STOP:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, item: _Item) -> Optional[str]:
        """Writes one record; returns its prefix, or None when it failed: counted, logged
        once per cause, never raised (a full disk must not stop the writer or a request)."""
        name, spec, build, size = item
        self._queue_bytes.give_back(size)
        prefix = spec.filename_prefix
        try:
            record = build().SerializeToString()
        except Exception as error:  # a record we cannot build costs that record only
            self._failed(name, f"cannot build a record: {type(error).__name__}: {error}")
            return None
        try:
            open_file = self._files.get(prefix)
            if open_file is None:
                self._sequence += 1
                open_file = self._files[prefix] = _OpenFile(prefix, self._sequence)
                self._directories.add(os.path.dirname(prefix) or ".")
            open_file.write(record)
        except Exception as error:
            self._failed(name, f"cannot write under {prefix}: {type(error).__name__}: {error}")
            if prefix in self._files:
                self._close(prefix)   # the next record starts a new file
            return None
        self._count(name, "written")
        if open_file.bytes >= self.config.max_file_bytes:
            self._close(prefix)
        return prefix

    def _failed(self, name: str, message: str) -> None:
        self._count(name, "failed")
        if message not in self._reported_errors:
            self._reported_errors.add(message)
            log.error("request log for %s: %s", name, message)

    def _close(self, prefix: str) -> None:
        open_file = self._files.pop(prefix)
        try:
            open_file.close()
        except Exception as error:
            log.error("request log: cannot close %s: %s", open_file.open_path, error)
        self._retention.prune([os.path.dirname(prefix) or "."], force=True)

    def _close_files(self, older_than: float) -> None:
        now = time.monotonic()
        for prefix in [p for p, f in self._files.items() if now - f.opened >= older_than]:
            self._close(prefix)


def predict_protos(name: str, version: int, signature: str, inputs: Mapping[str, np.ndarray],
                   outputs: Mapping[str, np.ndarray]
                   ) -> tuple[model_pb2.ModelSpec, Any, Any]:
    """The ModelSpec, PredictRequest and PredictResponse TF Serving makes of a REST predict
    whose JSON became `inputs` and `outputs`."""
    from tensorflow_serving.apis import predict_pb2

    model_spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    model_spec.version.value = version
    request = predict_pb2.PredictRequest(model_spec=model_spec)
    response = predict_pb2.PredictResponse(model_spec=model_spec)
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tensor_proto(value))
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tensor_proto(value))
    return model_spec, request, response


def request_id(given: Optional[str]) -> str:
    """The id a request is logged under: the client's (cut to MAX_REQUEST_ID_CHARS), or a
    new uuid4 when it sent none."""
    given = (given or "").strip()
    return given[:MAX_REQUEST_ID_CHARS] if given else uuid.uuid4().hex


def _with_metadata(model_spec, spec: RequestLogSpec, timestamp: int,
                   request_id: str = "") -> prediction_log_pb2.PredictionLog:
    record = prediction_log_pb2.PredictionLog()
    metadata = record.log_metadata
    metadata.model_spec.CopyFrom(model_spec)
    metadata.sampling_config.sampling_rate = spec.sampling_rate
    metadata.saved_model_tags.append("serve")
    metadata.timestamp_secs = timestamp
    metadata.request_origin = request_id
    return record
