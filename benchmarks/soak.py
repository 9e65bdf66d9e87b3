"""Soak: fer-serve driven at about 80 % of its measured capacity for a long time, with slow
clients and early disconnects mixed in; does it stay the same server?

One model of a serving root is served by fer-serve in a subprocess on 127.0.0.1, logging
every request (sampling rate 1.0) to a scratch directory. First its capacity is measured
(closed-loop batch-1 clients, gRPC and REST alternately, for --capacity-s); then requests
are sent open-loop at --load (default 0.8) of that rate for --duration-s:

* normal requests, gRPC and REST alternately, each from a pool of client threads with
  persistent connections; each must end in an answer (200 / OK) or a shed (503,
  UNAVAILABLE, RESOURCE_EXHAUSTED), anything else counts as lost;
* --slow-share of them are slow REST clients: headers and part of the body, a pause
  (--slow-pause-s, below the server's read timeout) and then the rest; they must be
  answered. Half of them never send the rest and must get a 408;
* --disconnect-share of them are REST clients that send a whole request and hang up at
  once (a reset, not a goodbye).

Reported per window (--window-s, 60 by default: "per minute"): requests sent, p50/p99 of
the normal requests, outcomes by code, the server's threads and resident memory. At the
end: the request-log records read back against the answers that had to be logged, and the
tracebacks in the server's log. The goals: p99 within 1.5x of the first window's, threads
and memory flat (within 10 % of the first window), no request lost, request logs complete.

    .venv/bin/python benchmarks/soak.py --serving-root <run>/serving_models --models cnn \\
        [--duration-s 1800] [--window-s 60] [--out bench_runs/soak/soak.json]
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import queue
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_description  # noqa: E402
from benchmarks.serving import (HOST, PREDICT_METHOD, ServerProcess, logged_config,  # noqa: E402
                                predict_request, request_log_counters, resolve_models,
                                rest_body, test_image)

SHED_CODES = {"503", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}
ANSWER_CODES = {"200", "OK"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-root", default="demo_run/serving_models")
    parser.add_argument("--models", default="", help="the model to drive (default: the first)")
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of measured capacity")
    parser.add_argument("--max-rate", type=float, default=0.0,
                        help="requests/s at most, whatever the capacity (0: no cap)")
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32, help="client threads")
    parser.add_argument("--slow-share", type=float, default=0.02)
    parser.add_argument("--slow-pause-s", type=float, default=1.0)
    parser.add_argument("--disconnect-share", type=float, default=0.02)
    parser.add_argument("--rest-read-timeout-s", type=float, default=3.0,
                        help="the server's --rest-read-timeout-s (slow clients that never "
                             "finish wait this long for their 408)")
    parser.add_argument("--server-flags", default="", help="extra fer-serve flags")
    parser.add_argument("--out", default="bench_runs/soak/soak.json")
    return parser.parse_args(argv)


# --- the server's threads and memory -----------------------------------------------------

def process_facts(pid: int) -> dict[str, int]:
    """Threads and resident memory (KiB) of a process, from /proc."""
    facts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            facts[key] = int(value.split()[0])
    return {"threads": facts["Threads"], "rss_mib": round(facts["VmRSS"] / 1024, 1)}


# --- one request of each kind ------------------------------------------------------------

class Clients:
    """What one client thread needs: a persistent REST connection and a gRPC method."""

    def __init__(self, server: ServerProcess, model: str) -> None:
        import grpc
        self.server = server
        self.path = f"/v1/models/{model}:predict"
        self.body = rest_body(test_image())
        self.grpc_payload = predict_request(model, test_image()).SerializeToString()
        self.channel = grpc.insecure_channel(f"{HOST}:{server.grpc_port}")
        self.grpc_method = self.channel.unary_unary(PREDICT_METHOD)
        self.local = threading.local()

    def rest(self) -> str:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(
                HOST, self.server.rest_port, timeout=30)
        try:
            connection.request("POST", self.path, self.body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.will_close:
                connection.close()
            return str(response.status)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            return type(error).__name__

    def grpc(self) -> str:
        import grpc
        try:
            self.grpc_method(self.grpc_payload, timeout=30)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    def _raw(self) -> socket.socket:
        return socket.create_connection((HOST, self.server.rest_port), timeout=30)

    def slow(self, finish: bool, pause_s: float) -> str:
        """Headers and half the body, a pause, then the rest (or never)."""
        head = (f"POST {self.path} HTTP/1.1\r\nHost: soak\r\nContent-Length: "
                f"{len(self.body)}\r\n\r\n").encode()
        half = len(self.body) // 2
        try:
            with self._raw() as sock:
                sock.sendall(head + self.body[:half])
                if finish:
                    time.sleep(pause_s)
                    sock.sendall(self.body[half:])
                response = http.client.HTTPResponse(sock)
                response.begin()
                response.read()   # all of it: hanging up on part is a disconnect
                return str(response.status)
        except (OSError, http.client.HTTPException) as error:
            return type(error).__name__

    def disconnect(self) -> str:
        """A whole request, then a reset at once: the server's answer meets no one."""
        try:
            sock = self._raw()
            sock.sendall((f"POST {self.path} HTTP/1.1\r\nHost: soak\r\nContent-Length: "
                          f"{len(self.body)}\r\n\r\n").encode() + self.body)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return "disconnected"
        except OSError as error:
            return type(error).__name__

    def close(self) -> None:
        self.channel.close()


# --- capacity ----------------------------------------------------------------------------

def measure_capacity(clients: Clients, threads: int, seconds: float) -> tuple[float, int]:
    """Requests/s of `threads` closed-loop clients, gRPC and REST alternately, and the
    requests answered (the server logs them too)."""
    done = [0] * threads
    end = time.monotonic() + seconds

    def loop(index: int) -> None:
        call = clients.grpc if index % 2 else clients.rest
        while time.monotonic() < end:
            if call() in ANSWER_CODES:
                done[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started), sum(done)


# --- the soak ----------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)), 2) if values else None


def soak(server: ServerProcess, model: str, rate: float, args: argparse.Namespace
         ) -> dict[str, Any]:
    """Open-loop load at `rate` requests/s for args.duration_s; per-window figures."""
    clients = Clients(server, model)
    rng = np.random.default_rng(0)
    tickets: queue.Queue = queue.Queue()
    lock = threading.Lock()
    windows: list[dict[str, Any]] = []
    current = {"latencies": [], "codes": collections.Counter(), "sent": 0}
    kinds = collections.Counter()

    def record(kind: str, code: str, latency_ms: Optional[float] = None) -> None:
        with lock:
            current["codes"][f"{kind}:{code}"] += 1
            if latency_ms is not None and code in ANSWER_CODES:
                current["latencies"].append(latency_ms)

    def worker() -> None:
        while True:
            ticket = tickets.get()
            if ticket is None:
                return
            kind = ticket
            started = time.perf_counter()
            code = clients.grpc() if kind == "grpc" else clients.rest()
            record(kind, code, (time.perf_counter() - started) * 1000)

    def side_request(kind: str) -> None:
        if kind == "disconnect":
            record(kind, clients.disconnect())
        else:
            finish = kind == "slow"
            record(kind, clients.slow(finish, args.slow_pause_s))

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
    for thread in pool:
        thread.start()
    side_threads: list[threading.Thread] = []
    start = time.monotonic()
    window_start, sent = start, 0
    while True:
        now = time.monotonic()
        if now - window_start >= args.window_s or now - start >= args.duration_s:
            with lock:
                closed, current = current, {"latencies": [], "codes": collections.Counter(),
                                            "sent": 0}
            windows.append({"window": len(windows) + 1, "sent": closed["sent"],
                            "p50_ms": _percentile(closed["latencies"], 50),
                            "p99_ms": _percentile(closed["latencies"], 99),
                            "codes": dict(closed["codes"]),
                            **process_facts(server.process.pid)})
            print(json.dumps(windows[-1]), flush=True)
            window_start = now
            if now - start >= args.duration_s:
                break
        due = start + sent / rate
        if due > now:
            time.sleep(min(due - now, 0.05))
            continue
        draw = rng.random()
        if draw < args.disconnect_share:
            kind = "disconnect"
        elif draw < args.disconnect_share + args.slow_share:
            kind = "slow" if rng.random() < 0.5 else "slow_never"
        else:
            kind = "grpc" if sent % 2 else "rest"
        kinds[kind] += 1
        with lock:
            current["sent"] += 1
        if kind in ("grpc", "rest"):
            tickets.put(kind)
        else:
            thread = threading.Thread(target=side_request, args=(kind,), daemon=True)
            thread.start()
            side_threads.append(thread)
            side_threads = [t for t in side_threads if t.is_alive()]
        sent += 1
    # Let every request finish (the ones still in flight are counted in a last window).
    for _ in pool:
        tickets.put(None)
    for thread in pool + side_threads:
        thread.join(timeout=60)
    with lock:
        tail = current
    clients.close()
    return {"windows": windows, "tail_codes": dict(tail["codes"]), "kinds": dict(kinds),
            "sent": sent}


def tally(result: dict[str, Any]) -> dict[str, Any]:
    """Requests by what became of them, over all windows and the tail."""
    codes = collections.Counter(result["tail_codes"])
    for window in result["windows"]:
        codes.update(window["codes"])
    expected = {"grpc": ANSWER_CODES | SHED_CODES, "rest": ANSWER_CODES | SHED_CODES,
                "slow": {"200"} | SHED_CODES, "slow_never": {"408"} | SHED_CODES,
                "disconnect": {"disconnected"}}
    lost = {key: count for key, count in codes.items()
            if key.split(":", 1)[1] not in expected[key.split(":", 1)[0]]}
    answered = sum(count for key, count in codes.items()
                   if key.split(":", 1)[1] in ANSWER_CODES)
    shed = sum(count for key, count in codes.items() if key.split(":", 1)[1] in SHED_CODES)
    return {"codes": dict(codes), "lost": lost, "answered": answered,
            "shed": shed, "accounted": sum(codes.values())}


def run_soak(serving_root: str, model: str = "", duration_s: float = 1800.0,
             **overrides: Any) -> dict[str, Any]:
    """The whole soak (capacity, load, checks); returns the report. `overrides`: any
    parse_args field (window_s, load, max_rate, ...)."""
    args = parse_args([])
    args.serving_root, args.models, args.duration_s = serving_root, model, duration_s
    for key, value in overrides.items():
        setattr(args, key, value)
    from fer_pipeline.serving.request_log import read_logs

    [chosen] = resolve_models(args.serving_root, [args.models] if args.models else [])[:1]
    scratch = tempfile.mkdtemp(prefix="fer-soak-")
    config = logged_config([chosen], scratch, 1.0)
    # Retention off: the soak checks that every answer is logged, and at ~660 requests/s the
    # default 8 GiB per log directory is reached within 25 minutes, after which the oldest
    # files are deleted by design (a 30-minute run read back 894,084 of 1,161,414 records).
    # --server-flags given later win.
    flags = ["--rest-read-timeout-s", str(args.rest_read_timeout_s),
             "--request-log-max-total-bytes", "0", "--request-log-max-age-s", "0",
             *args.server_flags.split()]
    server = ServerProcess(config, os.path.join(scratch, "server.log"), flags)
    try:
        warm = Clients(server, chosen["name"])
        capacity, answered_first = measure_capacity(warm, min(args.clients, 16),
                                                    args.capacity_s)
        warm.close()
        rate = capacity * args.load
        if args.max_rate:
            rate = min(rate, args.max_rate)
        print(f"capacity {capacity:.0f} requests/s; soak at {rate:.0f}/s for "
              f"{args.duration_s:g} s", flush=True)
        before = process_facts(server.process.pid)
        result = soak(server, chosen["name"], rate, args)
        after = process_facts(server.process.pid)
        time.sleep(1.0)   # the writer drains its queue
        log_counters = request_log_counters(server, chosen["name"])
    finally:
        server.stop()
    with open(os.path.join(scratch, "server.log")) as handle:
        server_log = handle.read()
    records = sum(1 for _ in read_logs(os.path.join(scratch, "logs", chosen["name"])))
    counts = tally(result)
    disconnects = counts["codes"].get("disconnect:disconnected", 0)
    logged = answered_first + counts["answered"]   # every answer, capacity phase included
    windows = result["windows"]
    first = windows[0]
    report = {
        "model": chosen["name"], "version": chosen["version"], "cpu": cpu_description(),
        "capacity_per_s": round(capacity, 1), "rate_per_s": round(rate, 1),
        "duration_s": args.duration_s, "window_s": args.window_s,
        "slow_share": args.slow_share, "disconnect_share": args.disconnect_share,
        "before": before, "after": after, "windows": windows, **counts,
        "sent": result["sent"], "kinds": result["kinds"],
        "request_log_records": records, "request_log_counters": log_counters,
        # Logged after the answer went out: a disconnected client's answer may or may not
        # have been written (and logged) before its reset arrived.
        "request_logs_complete": logged <= records <= logged + disconnects,
        "tracebacks_in_server_log": server_log.count("Traceback"),
        "p99_ratio_max": (round(max(w["p99_ms"] or 0 for w in windows) / first["p99_ms"], 2)
                          if first["p99_ms"] else None),
        "threads_ratio_max": round(max(w["threads"] for w in windows) / first["threads"], 3),
        "rss_ratio_max": round(max(w["rss_mib"] for w in windows) / first["rss_mib"], 3),
    }
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_soak(args.serving_root, args.models, args.duration_s,
                      **{k: v for k, v in vars(args).items()
                         if k not in ("serving_root", "models", "duration_s")})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
