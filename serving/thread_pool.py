"""A gRPC server's worker pool with every thread started up front.

A ThreadPoolExecutor starts a thread only when a call finds none idle, so under load a
server's thread count crept up for minutes (61 -> 68 in a 30-minute soak of fer-serve,
docs/benchmarks.md). Started at once, as TF Serving starts its own, the count stays what it
was at start-up, whatever the load. grpc.Server.stop leaves its pool's threads running: the
server's owner shuts the pool down after it.
"""
from __future__ import annotations

import threading
from concurrent import futures

__all__ = ["started_thread_pool"]


def started_thread_pool(workers: int, thread_name_prefix: str) -> futures.ThreadPoolExecutor:
    """A ThreadPoolExecutor of `workers` threads, all of them already running."""
    pool = futures.ThreadPoolExecutor(max_workers=workers,
                                      thread_name_prefix=thread_name_prefix)
    everyone_started = threading.Barrier(workers + 1)
    for _ in range(workers):   # each call blocks its thread, so the next one needs a new one
        pool.submit(everyone_started.wait)
    everyone_started.wait()
    return pool
