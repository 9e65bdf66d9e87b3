"""What bounds the request logs: the writer's queue in bytes, each log directory in size and age.

serving/request_log.py queues sampled requests for its writer thread. A record count alone
does not bound memory (4,096 records of up to 16 MiB each is 64 GiB), so the queue also
holds at most `queue_bytes` of request and response data: `QueueBytes` admits a record
when it fits and drops it otherwise (counted as dropped, like a full queue).

Nothing else removes old request logs, so a busy server fills its disk. `LogRetention`
keeps each directory the writer writes to within `max_total_bytes` (0: no limit) and
deletes files older than `max_age_s` (0: kept however old): closed `.tfrecord` files only,
oldest first (by modification time, then name); the files being written are counted but
never deleted. It runs on the writer thread: after every file it closes and at most once a
second otherwise, also while no request comes. Deletions are counted per directory on
/monitoring/prometheus/metrics.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

__all__ = ["QueueBytes", "LogRetention", "DeletedCounts", "arrays_bytes"]

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 1.0


def arrays_bytes(*groups: Mapping[str, np.ndarray]) -> int:
    """About the bytes a record of these arrays takes (data only; strings by length)."""
    total = 0
    for arrays in groups:
        for value in arrays.values():
            array = np.asarray(value)
            if array.dtype == object:
                total += sum(len(item) if isinstance(item, (bytes, str)) else 8
                             for item in array.flat)
            else:
                total += array.nbytes
    return total


class QueueBytes:
    """The bytes of the records waiting for the writer, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queued = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Reserves `size` bytes; False (nothing reserved) when they do not fit."""
        with self._lock:
            if self._queued + size > self.limit:
                return False
            self._queued += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._queued = max(0, self._queued - size)

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued


@dataclass
class DeletedCounts:
    files: int = 0
    bytes: int = 0


class LogRetention:
    """Keeps log directories within a total size and an age; see the module docstring."""

    def __init__(self, suffix: str, open_suffix: str, max_total_bytes: int,
                 max_age_s: float) -> None:
        self.suffix, self.open_suffix = suffix, open_suffix
        self.max_total_bytes, self.max_age_s = max_total_bytes, max_age_s
        self._last = float("-inf")
        self._deleted: dict[str, DeletedCounts] = {}
        self._lock = threading.Lock()        # the counters; pruning is the writer's alone

    def prune(self, directories: Iterable[str], force: bool = False) -> None:
        """Deletes what is over the bounds in each directory (at most once a second unless
        `force`); a directory that cannot be listed or a file that cannot be deleted is
        logged and skipped."""
        if not self.max_total_bytes and not self.max_age_s:
            return
        now = time.monotonic()
        if not force and now - self._last < PRUNE_EVERY_S:
            return
        self._last = now
        for directory in directories:
            try:
                self._prune(directory)
            except OSError as error:
                log.warning("request log retention: cannot prune %s: %s", directory, error)

    def _prune(self, directory: str) -> None:
        files = []   # (mtime, name, size, closed)
        with os.scandir(directory) as entries:
            for entry in entries:
                closed = entry.name.endswith(self.suffix)
                if not (closed or entry.name.endswith(self.open_suffix)):
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:   # renamed or deleted meanwhile
                    continue
                files.append((stat.st_mtime, entry.name, stat.st_size, closed))
        files.sort()
        total = sum(size for _, _, size, _ in files)
        cutoff = time.time() - self.max_age_s if self.max_age_s else float("-inf")
        for mtime, name, size, closed in files:
            too_old = mtime < cutoff
            too_big = bool(self.max_total_bytes) and total > self.max_total_bytes
            if not closed or not (too_old or too_big):
                continue
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass
            total -= size
            with self._lock:
                counts = self._deleted.setdefault(directory, DeletedCounts())
                counts.files += 1
                counts.bytes += size
            log.debug("request log retention: deleted %s (%s)", name,
                      "older than max_age_s" if too_old else "directory over max_total_bytes")

    def deleted(self) -> dict[str, DeletedCounts]:
        with self._lock:
            return {d: DeletedCounts(c.files, c.bytes) for d, c in self._deleted.items()}

    def prometheus_lines(self) -> list[str]:
        deleted = sorted(self.deleted().items())
        lines = []
        for field, help_text in (
                ("files", "Closed request log files deleted by retention (size or age)."),
                ("bytes", "Bytes of the request log files deleted by retention.")):
            metric = f"fer_serve_request_log_deleted_{field}_total"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{directory="{_label(directory)}"}} {getattr(counts, field)}'
                      for directory, counts in deleted]
        return lines


def _label(value: str) -> str:
    """A Prometheus label value (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
