"""Server-side batching: concurrent small requests share one model call.

One queue per (model version, signature, input dtypes and per-row shapes): only requests
whose rows can be concatenated share a queue. Like TF Serving's batch scheduler, each queue
has one collector and `num_batch_threads` executors:

* the collector forms a batch from the waiting requests, in arrival order. The batch closes
  when it holds `max_batch_size` rows, or when `batch_timeout_s` has passed since its first
  request arrived - but only once an executor is free to run it. While every executor is
  busy, the open batch keeps taking requests: it could not run any sooner, so waiting costs
  no latency and buys a fuller batch. There is one collector, not one per executor: when
  each executor collected its own batch, idle executors split the waiting requests between
  them, and under 16 concurrent clients batches averaged ~5 rows of 16 (docs/benchmarks.md).
* with `policy="fill"` the timeout is not used: a batch that is not full runs as soon as
  no other batch of its queue is running, and otherwise waits for the running one to end or
  for itself to fill. A lone request runs at once (no timeout added to its latency); under
  load, batches hold what arrived while the previous one ran, and only full batches run
  side by side. On a CPU-bound server the model's cost per image falls with the batch
  (docs/benchmarks.md), so batches that fill are throughput, and idle executors that split
  the waiting requests between them were the reason batches stayed small.
* an executor concatenates the batch's inputs along axis 0, runs the signature once and
  hands each request back its own slice of every output. Several executors let one batch's
  compute overlap the next one's transport.

A request that alone has `max_batch_size` rows or more runs by itself (TF Serving would
split it; we don't need to). When, besides the batch being formed, `max_enqueued_batches`
full batches' worth of rows already wait, a request is refused at once with UNAVAILABLE
(REST 503), as TF Serving does, rather than queued without bound; clients retry with backoff.

The collector and executors exit after `idle_exit_s` without work, so versions that were
unloaded do not keep threads (or the model objects they reference) alive.

The settings can come from a TF Serving batching parameters file (`fer-serve
--batching-parameters-file`, the text format of TF Serving's BatchingParameters), so one
file configures both servers.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from fer_pipeline.core.errors import ConfigError
from fer_pipeline.serving.model_manager import LoadedVersion, ServingError, check_deadline


@dataclass
class BatchingConfig:
    max_batch_size: int = 32
    batch_timeout_s: float = 0.002
    idle_exit_s: float = 5.0
    num_batch_threads: int = max(2, os.cpu_count() or 1)
    max_enqueued_batches: int = 10   # TF Serving's default
    policy: str = "timeout"          # or "fill": see the module docstring


# BatchingParameters fields this server understands, each an Int64Value: {"value": N}.
_PARAMETER_FIELDS = ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
                     "max_enqueued_batches")


def format_batching_parameters(config: BatchingConfig) -> str:
    """`config` as a TF Serving batching parameters file (--batching_parameters_file)."""
    values = {"max_batch_size": config.max_batch_size,
              "batch_timeout_micros": round(config.batch_timeout_s * 1e6),
              "num_batch_threads": config.num_batch_threads,
              "max_enqueued_batches": config.max_enqueued_batches}
    return "".join(f"{name} {{ value: {values[name]} }}\n" for name in _PARAMETER_FIELDS)


def read_batching_parameters(path: str) -> BatchingConfig:
    """A TF Serving batching parameters file; fields it leaves out keep our defaults.
    Fields the embedded server cannot honour (allowed_batch_sizes, ...) are an error, not
    silently ignored."""
    with open(path) as handle:
        text = re.sub(r"#[^\n]*", "", handle.read())
    found = dict(re.findall(r"\b(\w+)\s*:?\s*\{\s*value\s*:\s*(\d+)\s*\}", text))
    leftover = re.sub(r"\b\w+\s*:?\s*\{\s*value\s*:\s*\d+\s*\}", "", text).strip()
    unknown = sorted(set(found) - set(_PARAMETER_FIELDS))
    if leftover or unknown:
        what = f"field(s) {unknown}" if unknown else f"text {leftover[:60]!r}"
        raise ConfigError(f"{path}: {what} not supported; the embedded server reads "
                          f"{', '.join(_PARAMETER_FIELDS)} as '<name> {{ value: N }}'")
    values = {name: int(value) for name, value in found.items()}
    if "batch_timeout_micros" in values:
        values["batch_timeout_s"] = values.pop("batch_timeout_micros") / 1e6
    config = dataclasses.replace(BatchingConfig(), **values)
    if min(config.max_batch_size, config.num_batch_threads, config.max_enqueued_batches) < 1:
        raise ConfigError(f"{path}: max_batch_size, num_batch_threads and "
                          "max_enqueued_batches must be at least 1")
    return config


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    deadline: Optional[float] = None   # time.monotonic(); None: the caller waits forever
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Optional[dict[str, np.ndarray]] = None
    error: Optional[BaseException] = None


@dataclass
class BatchingStats:
    """What the batcher did so far: requests queued, model calls made, rows in them, and
    requests refused because the queue was full."""
    requests: int = 0
    batches: int = 0
    rows: int = 0
    refused: int = 0

    @property
    def mean_batch_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


def _batch_rows(inputs: Mapping[str, np.ndarray]) -> Optional[int]:
    """Rows in the request if every input has the same leading dimension, else None."""
    sizes = {np.shape(value)[0] if np.ndim(value) > 0 else None for value in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    return sizes.pop()


class _Queue:
    """The requests of one batching key, their collector thread and executor threads."""

    def __init__(self, model: LoadedVersion, signature: str, config: BatchingConfig,
                 on_idle, on_batch) -> None:
        self.model = model
        self.signature = signature
        self.config = config
        self._on_idle = on_idle
        self._on_batch = on_batch
        self._changed = threading.Condition()
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._waiting_rows = 0
        self._free_executors = max(1, config.num_batch_threads)
        self._ready: collections.deque[Optional[list[_Pending]]] = collections.deque()
        self._ready_changed = threading.Condition()
        self._closed = False
        self.threads = [threading.Thread(target=self._collect_batches, daemon=True,
                                         name="batch-collector")]
        self.threads += [threading.Thread(target=self._execute_batches, daemon=True,
                                          name=f"batch-executor-{i}")
                         for i in range(self._free_executors)]
        for thread in self.threads:
            thread.start()

    def put(self, item: _Pending) -> None:
        with self._changed:
            if self._closed:  # the batcher's lock orders put() and close_if_idle()
                raise RuntimeError("request routed to a closed batching queue")
            limit = self.config.max_enqueued_batches * self.config.max_batch_size
            if self._waiting_rows + item.rows > limit:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this "
                                                  "task was submitted is full")
            self._waiting.append(item)
            self._waiting_rows += item.rows
            # Wake the collector only when that can change what it does: a first request
            # (it takes every waiting one when it wakes) or enough rows for a full batch.
            if len(self._waiting) == 1 or self._waiting_rows >= self.config.max_batch_size:
                self._changed.notify()

    def close_if_idle(self) -> bool:
        with self._changed:
            if self._waiting:
                return False
            self._closed = True
            return True

    # --- collector -----------------------------------------------------------------------

    def _collect_batches(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                if self._on_idle(self):  # closes this queue unless a request just came
                    break
                continue
            with self._ready_changed:
                self._ready.append(batch)
                self._ready_changed.notify()
        with self._ready_changed:  # one stop marker per executor
            self._ready.extend([None] * len(self.threads[1:]))
            self._ready_changed.notify_all()

    def _next_batch(self) -> Optional[list[_Pending]]:
        """Blocks until a batch may run (see the module docstring); None when idle too long."""
        limit, timeout = self.config.max_batch_size, self.config.batch_timeout_s
        fill, executors = self.config.policy == "fill", len(self.threads) - 1
        with self._changed:
            while not self._waiting:
                if not self._changed.wait(self.config.idle_exit_s) and not self._waiting:
                    return None
            batch, rows = [], 0
            deadline = self._waiting[0].arrived + timeout
            while True:
                while self._waiting and rows + self._waiting[0].rows <= limit:
                    item = self._waiting.popleft()
                    self._waiting_rows -= item.rows
                    batch.append(item)
                    rows += item.rows
                full = rows >= limit or bool(self._waiting)  # the next one does not fit
                now = time.monotonic()
                if fill:   # no batch running: waiting would only idle the model
                    ready = full or self._free_executors == executors
                else:
                    ready = full or now >= deadline
                if self._free_executors and ready:
                    self._free_executors -= 1
                    return batch
                # Wake on a new request or a freed executor; else at the deadline.
                self._changed.wait(deadline - now if self._free_executors and not full
                                   and not fill else None)

    # --- executors -----------------------------------------------------------------------

    def _execute_batches(self) -> None:
        while True:
            with self._ready_changed:
                while not self._ready:
                    self._ready_changed.wait()
                batch = self._ready.popleft()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._free_executors += 1
                    self._changed.notify()

    @staticmethod
    def _unexpired(batch: list[_Pending]) -> list[_Pending]:
        """The requests whose callers still wait; the others are answered
        DEADLINE_EXCEEDED here, their rows never computed."""
        live = []
        for item in batch:
            try:
                check_deadline(item.deadline)
                live.append(item)
            except ServingError as error:
                item.error = error
                item.done.set()
        return live

    def _run(self, batch: list[_Pending]) -> None:
        batch = self._unexpired(batch)
        if not batch:
            return
        self._on_batch(sum(item.rows for item in batch))
        try:
            if len(batch) == 1:
                joined = batch[0].inputs
            else:
                joined = {key: np.concatenate([item.inputs[key] for item in batch])
                          for key in batch[0].inputs}
            outputs = self.model.run(self.signature, joined)
        except BaseException as error:  # every waiter must wake up, whatever happened
            for item in batch:
                item.error = error
                item.done.set()
            return
        start = 0
        for item in batch:
            item.outputs = {key: value[start:start + item.rows] for key, value in outputs.items()}
            start += item.rows
            item.done.set()


class Batcher:
    """Routes `run` calls through per-key queues; see the module docstring."""

    def __init__(self, config: BatchingConfig) -> None:
        self.config = config
        self._queues: dict[tuple, _Queue] = {}
        self._lock = threading.Lock()
        self._model_stats: dict[str, BatchingStats] = {}   # per model name

    def run(self, model: LoadedVersion, signature: str,
            inputs: Mapping[str, np.ndarray],
            deadline: Optional[float] = None) -> dict[str, np.ndarray]:
        rows = _batch_rows(inputs)
        if rows is None or rows == 0 or rows >= self.config.max_batch_size:
            check_deadline(deadline)
            return model.run(signature, inputs)  # cannot or need not be batched
        arrays = {key: np.asarray(value) for key, value in inputs.items()}
        key = (id(model), signature or "",
               tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in arrays.items())))
        pending = _Pending(arrays, rows, deadline)
        with self._lock:
            work_queue = self._queues.get(key)
            if work_queue is None or work_queue.model is not model:
                work_queue = _Queue(model, signature, self.config, self._idle_callback(key),
                                    self._batch_counter(model.name))
                self._queues[key] = work_queue
            stats = self._model_stats.setdefault(model.name, BatchingStats())
            try:
                work_queue.put(pending)
            except ServingError:
                stats.refused += 1
                raise
            stats.requests += 1
        pending.done.wait()
        if pending.error is not None:
            if isinstance(pending.error, ServingError):
                raise ServingError(pending.error.code, pending.error.message)
            raise pending.error
        return pending.outputs

    def _batch_counter(self, model_name: str):
        def count_batch(rows: int) -> None:
            with self._lock:
                stats = self._model_stats[model_name]
                stats.batches += 1
                stats.rows += rows
        return count_batch

    def snapshot(self) -> dict[str, BatchingStats]:
        """A consistent copy of the per-model counters."""
        with self._lock:
            return {name: dataclasses.replace(stats)
                    for name, stats in self._model_stats.items()}

    @property
    def stats(self) -> BatchingStats:
        """The counters summed over all models."""
        per_model = [dataclasses.astuple(stats) for stats in self.snapshot().values()]
        return BatchingStats(*map(sum, zip(*per_model)))

    def _idle_callback(self, key: tuple):
        def on_idle(work_queue: _Queue) -> bool:
            # Under the lock so a request cannot be queued between the check and removal.
            with self._lock:
                if not work_queue.close_if_idle():
                    return False
                if self._queues.get(key) is work_queue:
                    del self._queues[key]
                return True
        return on_idle
