"""Serving latency and throughput: fer-serve over gRPC and REST beside the in-process floor.

For each pushed model of a serving root (DIR/models.config, DIR/<model>/<version>/) this
measures, in one run:

* the floor: the SavedModel loaded in this process (tf.saved_model.load), its
  serving_default signature called on one int32 [1, 48, 48] image: batch-1 p50/p99, and the
  throughput of 16 threads calling it at batch 1 and, separately, at batch B (B = the
  batching server's --max-batch-size), in images/s;
* fer-serve in a subprocess on free 127.0.0.1 ports, once without batching and once per
  --batch-timeout-ms with --batching --max-batch-size B: batch-1 p50/p99 over gRPC
  (PredictionServiceStub, one persistent channel) and REST (one persistent http.client
  connection, row format), and the throughput of 16 concurrent clients sending batch-1
  requests for a fixed time.

* the transport alone: the same 16 clients against an echo gRPC server (the same kind of
  grpc.server, returning a fixed pre-serialized PredictResponse), whose server and client
  CPU per request, added to the in-process CPU per image at batch B, give the "transport
  ceiling": the most any server on this stack could reach with every core busy;
* the bare Python batching server (benchmarks/bare_batching_server.py: Predict alone,
  fill batching in one asyncio loop, no checks, logs or metrics) with the same clients:
  about the most any request path written in Python reaches here, so fer-serve's own
  per-request work is the gap between its row and this one;
* the batching servers' mean rows per model call in each throughput window, read from
  fer-serve's GET /monitoring/prometheus/metrics.

The 16 clients are threads spread over --client-procs processes (spawned, not forked), so
one client GIL does not cap the rate. To keep client CPU small they send a request
serialized once (gRPC: raw bytes on the Predict method; REST: one JSON body) and only check
the status; the client processes' and the server's CPU use are reported beside each rate,
so one can see who used the machine's cores. All requests use serving_default with int32
pixels, like the floor, and return all three outputs. Latencies and rates are medians over
repeated windows.

With --request-log-rates (e.g. 1.0,0.1), unbatched servers whose models.config logs
every model's requests at each sampling rate (serving/request_log.py) run beside the
unbatched server without logs, --rounds times in rotating order, so the cost of request
logs is read from one run: medians over rounds of batch-1 p50 and 16-client throughput,
against the goal of p50 within +0.2 ms and throughput within 5 % of logging off. Pass
--batch-timeout-ms "" to run those servers alone.

B defaults to 16, the number of clients: with every client waiting, one batch can hold all
of them. --batch-timeout-ms takes a list, one batching server per value, so the latency
cost of waiting longer for fuller batches is shown beside what it buys.

    .venv/bin/python benchmarks/serving.py [--serving-root demo_run/serving_models]
        [--batch-timeout-ms 2,5,10] [--request-log-rates 1.0,0.1 --rounds 3]
        [--out bench_runs/serving/serving.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_description  # noqa: E402

HOST = "127.0.0.1"
# TF Serving's flags for one thread per op and per graph: each batch then runs on one core,
# and two batch threads keep both cores busy (--single-tf-thread-too).
SINGLE_TF_THREAD = ["--tensorflow-intra-op-parallelism", "1",
                    "--tensorflow-inter-op-parallelism", "1"]
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
SIGNATURE = "serving_default"
GRPC_P50_TARGET_MS = 2.0          # gRPC p50 at most this much above the in-process p50
BATCHING_THROUGHPUT_TARGET = 0.70  # batching server >= 70 % of in-process at batch B
REQUEST_LOG_P50_TARGET_MS = 0.2    # request logs add at most this to the batch-1 p50
REQUEST_LOG_THROUGHPUT_TARGET = 0.95  # ... and keep this share of the 16-client throughput
NO_LOGS = "no batching"


# --- settings ----------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-root", default="demo_run/serving_models",
                        help="pushed models: DIR/models.config, DIR/<model>/<version>/")
    parser.add_argument("--models", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--out", default="bench_runs/serving/serving.json")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="processes the concurrent clients are spread over")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="B: the batching server's --max-batch-size and the in-process "
                             "batch it is compared with")
    parser.add_argument("--batch-timeout-ms", default="2",
                        help="comma-separated: one batching server per value; 'fill': one "
                             "with --batch-policy fill (no timeout; not run for the baseline)")
    parser.add_argument("--single-tf-thread-too", action="store_true",
                        help="beside each batching server, one more with "
                             "--tensorflow-intra-op-parallelism 1 "
                             "--tensorflow-inter-op-parallelism 1 (each batch on one core)")
    parser.add_argument("--server-flags", default="",
                        help="extra fer-serve flags for the batching servers, space-separated")
    parser.add_argument("--request-log-rates", default="",
                        help="comma-separated sampling rates: one unbatched server logging "
                             "requests at each, beside the one without logs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --request-log-rates: how often the unbatched servers "
                             "(with and without logs) run, in rotating order")
    parser.add_argument("--latency-calls", type=int, default=300, help="calls per window")
    parser.add_argument("--latency-windows", type=int, default=5)
    parser.add_argument("--latency-window-s", type=float, default=4.0,
                        help="a latency window also ends after this long")
    parser.add_argument("--throughput-windows", type=int, default=3)
    parser.add_argument("--throughput-window-s", type=float, default=3.0)
    parser.add_argument("--max-requests-per-client", type=int, default=20000,
                        help="bound on the requests one client sends in one window")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--baseline-rev", default="",
                        help="a git revision: its fer-serve (core/ and serving/ as of then) "
                             "runs the unbatched and batching servers too, in the same run, "
                             "labelled 'before <rev>'")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: the first model only, a few requests, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_calls, args.latency_windows, args.latency_window_s = 20, 2, 1.0
        args.throughput_windows, args.throughput_window_s = 1, 0.5
        args.warmup_s = 0.2
        args.max_requests_per_client = 200
    args.batch_timeouts = [v if v == "fill" else float(v)
                           for v in str(args.batch_timeout_ms).split(",") if v]
    try:
        args.log_rates = [float(v) for v in str(args.request_log_rates).split(",") if v]
    except ValueError:
        parser.error(f"--request-log-rates: not numbers: {args.request_log_rates}")
    if any(not 0 < rate <= 1 for rate in args.log_rates) or args.rounds < 1:
        parser.error("--request-log-rates must lie in (0, 1] and --rounds be at least 1")
    if args.clients % args.client_procs:
        parser.error("--clients must be a multiple of --client-procs")
    return args


# --- what is benchmarked -----------------------------------------------------------------

def resolve_models(serving_root: str, wanted: list[str]) -> list[dict[str, Any]]:
    """Each model of DIR/models.config with its newest version on disk. The base path is
    DIR/<name> when that exists (a copied serving root keeps working), else the config's."""
    from fer_pipeline.core.serving_root import read_model_server_config
    from fer_pipeline.serving.model_manager import list_versions

    config = os.path.join(serving_root, "models.config")
    models = []
    for spec in read_model_server_config(config):
        if wanted and spec.name not in wanted:
            continue
        local = os.path.join(serving_root, spec.name)
        base = os.path.abspath(local if os.path.isdir(local) else spec.base_path)
        versions = list_versions(base)
        if not versions:
            raise SystemExit(f"{spec.name}: no version under {base}")
        version = max(versions)
        path = os.path.join(base, str(version))
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        models.append({"name": spec.name, "version": version, "base_path": base, "path": path,
                       "saved_model_mb": round(size / 2**20, 1)})
    if not models:
        raise SystemExit(f"no model of {wanted or 'models.config'} in {config}")
    return models


def machine_facts() -> dict[str, Any]:
    import grpc
    import tensorflow as tf
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "cpu": cpu_description(), "loadavg_at_start": list(os.getloadavg()),
            "python": platform.python_version(), "platform": platform.platform(),
            "tensorflow": tf.__version__, "grpcio": grpc.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                               / 2**30, 1)}


def test_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, 48, 48)).astype(np.int32)


# --- statistics --------------------------------------------------------------------------

def latency_windows(call: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    """p50/p99 of single calls in each window; the medians over windows are the result."""
    windows = []
    for _ in range(args.latency_windows):
        times = []
        stop = time.perf_counter() + args.latency_window_s
        while len(times) < args.latency_calls and (not times or time.perf_counter() < stop):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000.0)
        windows.append({"calls": len(times), "p50_ms": float(np.percentile(times, 50)),
                        "p99_ms": float(np.percentile(times, 99)),
                        "mean_ms": float(np.mean(times))})
    return {"p50_ms": statistics.median(w["p50_ms"] for w in windows),
            "p99_ms": statistics.median(w["p99_ms"] for w in windows),
            "windows": windows}


def summarize_throughput(windows: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("images_per_s", "server_cores", "server_cpu_ms_per_image", "client_cores",
            "client_cpu_ms_per_image", "process_cores", "cpu_ms_per_image", "mean_batch_rows")
    result = {key: statistics.median(w[key] for w in windows)
              for key in keep if all(key in w for w in windows)}
    result["errors"] = sum(w.get("errors", 0) for w in windows)
    result["windows"] = windows
    return result


def warm_up(call: Callable[[], Any], seconds: float, at_least: int = 5) -> None:
    stop = time.perf_counter() + seconds
    done = 0
    while done < at_least or time.perf_counter() < stop:
        call()
        done += 1


# --- the floor: the SavedModel in this process -------------------------------------------

def in_process(model: dict[str, Any], args: argparse.Namespace) -> tuple[dict, dict]:
    """Latency and 16-thread throughput of the signature called in this process; also the
    reference outputs the servers' answers are checked against."""
    import tensorflow as tf

    started = time.perf_counter()
    loaded = tf.saved_model.load(model["path"])
    signature = loaded.signatures[SIGNATURE]
    load_s = time.perf_counter() - started
    image = test_image()

    def call(images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = signature(pixels=tf.constant(images, tf.int32))
        return {key: value.numpy() for key, value in outputs.items()}

    reference = call(image)
    batch = np.repeat(image, args.max_batch_size, axis=0)
    warm_up(lambda: call(batch), args.warmup_s / 2)
    warm_up(lambda: call(image), args.warmup_s)
    latency = latency_windows(lambda: call(image), args)

    def threaded(images: np.ndarray) -> dict[str, Any]:
        windows = []
        for _ in range(args.throughput_windows):
            counts = [0] * args.clients
            cpu0, start = _cpu_seconds_self(), time.time() + 0.05
            end = start + args.throughput_window_s

            def worker(index: int) -> None:
                while time.time() < start:
                    time.sleep(0.001)
                for _ in range(args.max_requests_per_client):
                    if time.time() > end:
                        break
                    call(images)
                    counts[index] += 1

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            # Every call started in the window is counted and the time (and CPU) run until
            # the last one ends: a batch-16 VGG16 call takes seconds under 16 threads, and
            # dropping the calls still running at the window's end while keeping their CPU
            # overstated the CPU per image by half.
            cpu, elapsed = _cpu_seconds_self() - cpu0, time.time() - start
            images_done = sum(counts) * len(images)
            windows.append({"requests": sum(counts), "elapsed_s": elapsed,
                            "images_per_s": images_done / elapsed,
                            "process_cores": cpu / elapsed,
                            "cpu_ms_per_image": cpu * 1000.0 / max(images_done, 1)})
        return summarize_throughput(windows)

    result = {"load_s": load_s, "latency": latency,
              "throughput_batch1": threaded(image),
              f"throughput_batch{args.max_batch_size}": threaded(batch)}
    # Dropped by rebinding, not del: call() closes over the signature.
    signature = loaded = None
    return result, reference


def _cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds_pid(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- fer-serve in a subprocess -----------------------------------------------------------

class ServerProcess:
    """fer-serve on 127.0.0.1, ports chosen by the server (--port 0), read from its banner."""

    def __init__(self, config: str, log_path: str, extra: list[str],
                 source: Optional[str] = None) -> None:
        fer_serve = Path(sys.executable).with_name("fer-serve")
        command = [str(fer_serve)] if fer_serve.exists() else \
            [sys.executable, "-m", "fer_pipeline.serving.server"]
        if source is not None:   # another revision's fer_pipeline, found before ours
            command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {source!r}); "
                       "from fer_pipeline.serving.server import entry_point; entry_point()"]
        self.command = command + ["--model-config", config, "--host", HOST, "--port", "0",
                                  "--rest-port", "0", "--poll-seconds", "30",
                                  "--log-level", "INFO", *extra]
        self.log = open(log_path, "w+")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True,
                                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        line = self.process.stdout.readline()  # printed once models are loaded, ports bound
        match = re.search(r"gRPC on [^:]+:(\d+), REST on http://[^:]+:(\d+)", line)
        if match is None:
            self.stop()   # closes the log: read it back by name
            raise RuntimeError(f"fer-serve did not start: {line!r}\n"
                               f"{Path(log_path).read_text()[-3000:]}")
        self.grpc_port, self.rest_port = int(match.group(1)), int(match.group(2))
        self.start_s = time.perf_counter() - started

    def cpu_seconds(self) -> float:
        return _cpu_seconds_pid(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def predict_request(model: str, image: np.ndarray):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = SIGNATURE
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(image))
    return request


def rest_body(image: np.ndarray) -> bytes:
    return json.dumps({"signature_name": SIGNATURE, "instances": image.tolist()}).encode()


def server_latency(server: ServerProcess, model: dict[str, Any], reference: dict,
                   args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 latency over gRPC (stub, persistent channel) and REST (keep-alive
    connection); the first answers are checked against the in-process outputs."""
    import http.client

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    image = test_image()
    request = predict_request(model["name"], image)
    channel = grpc.insecure_channel(f"{HOST}:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def grpc_call() -> np.ndarray:
        response = stub.Predict(request, timeout=30)
        return tf.make_ndarray(response.outputs["probabilities"])

    connection = http.client.HTTPConnection(HOST, server.rest_port, timeout=30)
    path, body = f"/v1/models/{model['name']}:predict", rest_body(image)

    def rest_call() -> list:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST {response.status}: {payload[:300]!r}")
        return json.loads(payload)["predictions"]

    try:
        expected = reference["probabilities"]
        agrees = {"grpc": bool(np.allclose(grpc_call(), expected, atol=1e-5)),
                  "rest": bool(np.allclose([r["probabilities"] for r in rest_call()],
                                           expected, atol=1e-5))}
        result = {"agrees_with_in_process": agrees}
        for name, call in (("grpc", grpc_call), ("rest", rest_call)):
            warm_up(call, args.warmup_s)
            result[name] = latency_windows(call, args)
        return result
    finally:
        connection.close()
        channel.close()


def batching_counters(server: Any, model: str) -> Optional[dict[str, int]]:
    """fer-serve's batching counters for one model (GET /monitoring/prometheus/metrics);
    None for a server without that endpoint."""
    import urllib.request
    port = getattr(server, "rest_port", None)
    if port is None:
        return None
    with urllib.request.urlopen(f"http://{HOST}:{port}/monitoring/prometheus/metrics",
                                timeout=10) as response:
        text = response.read().decode()
    counters = {}
    for field in ("requests", "batches", "rows"):
        match = re.search(rf'^fer_serve_batching_{field}_total{{model_name="{re.escape(model)}"}}'
                          rf" (\d+)$", text, re.MULTILINE)
        counters[field] = int(match.group(1)) if match else 0
    return counters


def mean_batch(before: Optional[dict], after: Optional[dict]) -> dict[str, float]:
    """Mean rows per model call between two counter readings (nothing without batching)."""
    if before is None or after is None or after["batches"] == before["batches"]:
        return {}
    return {"mean_batch_rows": (after["rows"] - before["rows"])
            / (after["batches"] - before["batches"])}


# --- concurrent clients in spawned processes ---------------------------------------------

def _client_process(conn, protocol: str, port: int, target: str, payload: bytes,
                    threads: int) -> None:
    """One client process: `threads` clients, each with its own connection, sending the
    same pre-serialized batch-1 request; answers commands from the parent over `conn`."""
    if protocol == "grpc":
        import grpc
        channels = [grpc.insecure_channel(f"{HOST}:{port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(threads)]
        methods = [channel.unary_unary(target) for channel in channels]

        def make_call(index: int) -> Callable[[], None]:
            method = methods[index]
            return lambda: method(payload, timeout=30)
    else:
        import http.client
        connections = [http.client.HTTPConnection(HOST, port, timeout=30)
                       for _ in range(threads)]
        headers = {"Content-Type": "application/json"}

        def make_call(index: int) -> Callable[[], None]:
            connection = connections[index]

            def call() -> None:
                connection.request("POST", target, payload, headers)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
            return call
    calls = [make_call(i) for i in range(threads)]

    def run(start: float, end: float, limit: int) -> dict[str, Any]:
        counts, errors, first_error = [0] * threads, [0] * threads, []

        def client(index: int) -> None:
            call = calls[index]
            while time.time() < start:
                time.sleep(0.0005)
            for _ in range(limit):  # counted like the floor: calls started in the window
                if time.time() > end:
                    break
                try:
                    call()
                    counts[index] += 1
                except Exception as error:  # noqa: BLE001 - counted and reported
                    errors[index] += 1
                    if not first_error:
                        first_error.append(f"{type(error).__name__}: {error}"[:300])
                    time.sleep(0.01)

        cpu0 = _cpu_seconds_self()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return {"requests": sum(counts), "errors": sum(errors),
                "first_error": first_error[0] if first_error else "",
                "cpu_s": _cpu_seconds_self() - cpu0, "finished": time.time()}

    conn.send("ready")
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        _, start, end, limit = command
        conn.send(run(start, end, limit))
    conn.close()


def concurrent_throughput(server: ServerProcess, model: dict[str, Any], protocol: str,
                          args: argparse.Namespace) -> dict[str, Any]:
    """images/s of args.clients batch-1 clients (threads over args.client_procs processes)
    in fixed windows; server and client CPU use measured over the same windows."""
    import multiprocessing

    image = test_image()
    if protocol == "grpc":
        port, target = server.grpc_port, PREDICT_METHOD
        payload = predict_request(model["name"], image).SerializeToString()
    else:
        port, target = server.rest_port, f"/v1/models/{model['name']}:predict"
        payload = rest_body(image)
    context = multiprocessing.get_context("spawn")  # no fork after TF and gRPC started
    per_process = args.clients // args.client_procs
    pipes, processes = [], []
    try:
        for _ in range(args.client_procs):
            parent, child = context.Pipe()
            process = context.Process(target=_client_process, daemon=True,
                                      args=(child, protocol, port, target, payload,
                                            per_process))
            process.start()
            pipes.append(parent)
            processes.append(process)
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a client process did not start")

        def window(seconds: float, limit: int) -> dict[str, Any]:
            start = time.time() + 0.2
            batching0 = batching_counters(server, model["name"])
            server_cpu0 = server.cpu_seconds()
            for pipe in pipes:
                pipe.send(("run", start, start + seconds, limit))
            parts = [pipe.recv() for pipe in pipes]
            server_cpu = server.cpu_seconds() - server_cpu0
            batching1 = batching_counters(server, model["name"])
            elapsed = max(p["finished"] for p in parts) - start
            requests = sum(p["requests"] for p in parts)
            errors = sum(p["errors"] for p in parts)
            client_cpu = sum(p["cpu_s"] for p in parts)
            return {"requests": requests, "errors": errors, "elapsed_s": elapsed,
                    "first_error": next((p["first_error"] for p in parts if p["first_error"]),
                                        ""),
                    "images_per_s": requests / elapsed,
                    "client_cpu_ms_per_image": client_cpu * 1000.0 / max(requests, 1),
                    # Server CPU is read from just before the window's start (idle then).
                    "server_cores": server_cpu / elapsed,
                    "server_cpu_ms_per_image": server_cpu * 1000.0 / max(requests, 1),
                    "client_cores": client_cpu / elapsed,
                    **mean_batch(batching0, batching1)}

        window(args.warmup_s, args.max_requests_per_client)  # connections, threads, caches
        windows = [window(args.throughput_window_s, args.max_requests_per_client)
                   for _ in range(args.throughput_windows)]
        result = summarize_throughput(windows)
        result["clients"] = f"{args.client_procs} processes x {per_process} threads"
        return result
    finally:
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


# --- the transport alone: a gRPC server that does no work --------------------------------

def _echo_server_process(conn, response: bytes, workers: int) -> None:
    """A grpc.server of the kind fer-serve runs (sync, same thread pool size) whose Predict
    returns a fixed pre-serialized PredictResponse: what the transport alone costs."""
    from concurrent import futures

    import grpc
    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {"Predict": grpc.unary_unary_rpc_method_handler(lambda request, context: response)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((handler,))
    conn.send(server.add_insecure_port(f"{HOST}:0"))
    server.start()
    conn.recv()  # blocks until the parent says stop
    server.stop(0)


class EchoServer:
    def __init__(self, reference: dict[str, np.ndarray]) -> None:
        import multiprocessing

        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        from fer_pipeline.serving.server import ServerConfig
        response = predict_pb2.PredictResponse()
        for key, value in reference.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_echo_server_process, daemon=True,
            args=(child, response.SerializeToString(), ServerConfig.grpc_workers))
        self.process.start()
        self.grpc_port = self._conn.recv()

    def cpu_seconds(self) -> float:
        return _cpu_seconds_pid(self.process.pid)

    def stop(self) -> None:
        self._conn.send("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


class BareServer:
    """benchmarks/bare_batching_server.py in a subprocess (gRPC only)."""

    def __init__(self, model: dict[str, Any], max_batch_size: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "bare_batching_server.py"),
             model["path"], "--max-batch-size", str(max_batch_size)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        line = self.process.stdout.readline()
        match = re.search(r"gRPC on [^:]+:(\d+)", line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"the bare server did not start: {line!r}\n"
                               f"{self.process.stderr.read()[-3000:]}")
        self.grpc_port = int(match.group(1))

    def cpu_seconds(self) -> float:
        return _cpu_seconds_pid(self.process.pid)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def transport_ceiling(report: dict[str, Any], name: str, batch_key: str) -> dict[str, float]:
    """The most a server could reach if the model's compute (in-process CPU per image at
    batch B) and the bare transport (echo server + its clients, CPU per request) were the
    only work and every core were busy all the time."""
    floor, echo = report["in_process"][name][batch_key], report["transport"][name]
    cpu_ms = (floor["cpu_ms_per_image"] + echo["server_cpu_ms_per_image"]
              + echo["client_cpu_ms_per_image"])
    rate = report["machine"]["usable_cpus"] * 1000.0 / cpu_ms
    return {"cpu_ms_per_image": cpu_ms, "images_per_s": rate,
            "of_floor": rate / floor["images_per_s"]}


# --- the run -----------------------------------------------------------------------------

def log_label(rate: Optional[float]) -> str:
    return NO_LOGS if rate is None else f"{NO_LOGS}, request log {rate:g}"


def baseline_source(rev: str, directory: str) -> str:
    """core/ and serving/ of git revision `rev` as a fer_pipeline package under
    `directory` (what ServerProcess's `source` runs)."""
    package = os.path.join(directory, "fer_pipeline")
    os.makedirs(package)
    archive = subprocess.run(["git", "archive", rev, "core", "serving"], cwd=REPO,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", package], input=archive, check=True)
    return directory


def server_configs(args: argparse.Namespace
                   ) -> list[tuple[str, list[str], Optional[float], int]]:
    """(label, flags, request-log sampling rate or None, round) per server, in run order:
    the unbatched servers (rotated each round so drift does not favour one), then the
    batching ones; with --baseline-rev, the unbatched and batching ones again from that
    revision ("before <rev>" in their label)."""
    rates: list[Optional[float]] = [None, *args.log_rates]
    rounds = args.rounds if args.log_rates else 1
    configs = []
    for round_ in range(rounds):
        shift = round_ % len(rates)
        for rate in rates[shift:] + rates[:shift]:
            configs.append((log_label(rate), [], rate, round_))
    threads = [("", [])]
    if args.single_tf_thread_too:
        threads.append((", 1 TF thread", SINGLE_TF_THREAD))
    for timeout in args.batch_timeouts:
        policy = (["--batch-policy", "fill"] if timeout == "fill"
                  else ["--batch-timeout-ms", f"{timeout:g}"])
        for suffix, thread_flags in threads:
            configs.append((f"batching B={args.max_batch_size}, "
                            f"{timeout if timeout == 'fill' else f'{timeout:g} ms'}{suffix}",
                            ["--batching", "--max-batch-size", str(args.max_batch_size),
                             *policy, *thread_flags, *args.server_flags.split()], None, 0))
    if args.baseline_rev:   # the fill policy is newer than any baseline
        configs += [(f"{label} (before {args.baseline_rev})", flags, None, 0)
                    for label, flags, rate, _ in list(configs)
                    if rate is None and "fill" not in flags
                    and not set(SINGLE_TF_THREAD) & set(flags)]
    return configs


def request_log_counters(server: ServerProcess, model: str) -> dict[str, int]:
    """fer-serve's request-log counters for one model (its metrics endpoint)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{HOST}:{server.rest_port}"
                                "/monitoring/prometheus/metrics", timeout=10) as response:
        text = response.read().decode()
    counters = {}
    for field in ("written", "dropped", "failed"):
        match = re.search(rf'^fer_serve_request_log_{field}_total'
                          rf'{{model_name="{re.escape(model)}"}} (\d+)$', text, re.MULTILINE)
        counters[field] = int(match.group(1)) if match else 0
    return counters


def logged_config(models: list[dict[str, Any]], directory: str,
                  rate: Optional[float]) -> str:
    """models.config serving the measured versions, pinned; with request logs under
    `directory` at `rate` when a rate is given."""
    from fer_pipeline.core.serving_root import ModelSpec, RequestLogSpec, write_model_server_config
    return write_model_server_config(os.path.join(directory, "models.config"), [
        ModelSpec(m["name"], m["base_path"], "specific", versions=[m["version"]],
                  request_log=None if rate is None else RequestLogSpec(
                      os.path.join(directory, "logs", m["name"], "requests"), rate))
        for m in models])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fer_pipeline.serving.request_log import read_logs

    wanted = [m for m in args.models.split(",") if m]
    models = resolve_models(args.serving_root, wanted)
    if args.quick:
        models = models[:1]
    report: dict[str, Any] = {
        "quick": args.quick, "machine": machine_facts(),
        "settings": {key: getattr(args, key) for key in (
            "serving_root", "clients", "client_procs", "max_batch_size", "batch_timeouts",
            "log_rates", "rounds",
            "latency_calls", "latency_windows", "throughput_windows", "throughput_window_s",
            "max_requests_per_client", "warmup_s")},
        "models": models, "in_process": {}, "transport": {}, "bare": {}, "servers": []}
    references = {}
    for model in models:
        print(f"in-process: {model['name']} v{model['version']}", flush=True)
        report["in_process"][model["name"]], references[model["name"]] = \
            in_process(model, args)
    import gc
    gc.collect()
    for model in models:
        print(f"transport alone (echo gRPC server): {model['name']}", flush=True)
        echo = EchoServer(references[model["name"]])
        try:
            report["transport"][model["name"]] = concurrent_throughput(echo, model, "grpc", args)
        finally:
            echo.stop()
        print(f"bare Python batching server: {model['name']}", flush=True)
        bare = BareServer(model, args.max_batch_size)
        try:
            report["bare"][model["name"]] = concurrent_throughput(bare, model, "grpc", args)
        finally:
            bare.stop()

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for index, (label, extra, rate, round_) in enumerate(server_configs(args)):
            print(f"fer-serve ({label}{f', round {round_ + 1}' if round_ or rate else ''})",
                  flush=True)
            # The versions measured in-process, pinned, whatever else appears meanwhile.
            directory = os.path.join(tmp, f"server-{index}")
            os.makedirs(directory)
            config = logged_config(models, directory, rate)
            source = None
            if "(before " in label:
                source = os.path.join(tmp, "baseline")
                if not os.path.isdir(source):
                    baseline_source(args.baseline_rev, source)
            server = ServerProcess(config, os.path.join(tmp, "server.log"), extra, source)
            entry = {"config": label, "flags": extra, "start_s": server.start_s,
                     "request_log_rate": rate, "round": round_, "models": {}}
            try:
                for model in models:
                    measured = server_latency(server, model, references[model["name"]], args)
                    for protocol in ("grpc", "rest"):
                        measured[protocol]["throughput"] = concurrent_throughput(
                            server, model, protocol, args)
                    if rate is not None:
                        measured["request_log"] = request_log_counters(server, model["name"])
                    entry["models"][model["name"]] = measured
            finally:
                server.stop()
            if rate is not None:  # stopped: every file is closed; what they hold, read back
                for model in models:
                    logs = os.path.join(directory, "logs", model["name"])
                    counted = entry["models"][model["name"]]["request_log"]
                    counted["records_read"] = sum(1 for _ in read_logs(logs)) \
                        if os.path.isdir(logs) else 0
                    counted["bytes"] = sum(f.stat().st_size for f in Path(logs).rglob("*")
                                           if f.is_file())
            report["servers"].append(entry)
    report["targets"] = check_targets(report, args)
    report["request_logs"] = request_log_summary(report, args)
    report["markdown"] = markdown(report, args)
    return report


def request_log_summary(report: dict[str, Any], args: argparse.Namespace
                        ) -> list[dict[str, Any]]:
    """Per model and sampling rate: medians over rounds of batch-1 p50 and 16-client
    throughput beside the same medians without logs, and whether the goals are met."""
    if not args.log_rates:
        return []

    def medians(label: str, name: str) -> dict[str, float]:
        runs = [s["models"][name] for s in report["servers"] if s["config"] == label]
        return {f"{protocol}_{key}": statistics.median(
                    r[protocol]["p50_ms"] if key == "p50_ms" else r[protocol]["throughput"][key]
                    for r in runs)
                for protocol in ("grpc", "rest")
                for key in ("p50_ms", "images_per_s", "server_cpu_ms_per_image")}

    rows = []
    for model in report["models"]:
        name = model["name"]
        off = medians(NO_LOGS, name)
        rows.append({"model": name, "rate": None, **off})
        for rate in args.log_rates:
            on = medians(log_label(rate), name)
            logged = [s["models"][name]["request_log"] for s in report["servers"]
                      if s["request_log_rate"] == rate]
            row = {"model": name, "rate": rate, **on,
                   "records": sum(c["records_read"] for c in logged),
                   "written": sum(c["written"] for c in logged),
                   "dropped": sum(c["dropped"] for c in logged),
                   "bytes_per_record": sum(c["bytes"] for c in logged)
                   / max(1, sum(c["records_read"] for c in logged))}
            for protocol in ("grpc", "rest"):
                row[f"{protocol}_p50_delta_ms"] = on[f"{protocol}_p50_ms"] - \
                    off[f"{protocol}_p50_ms"]
                row[f"{protocol}_throughput_ratio"] = on[f"{protocol}_images_per_s"] / \
                    off[f"{protocol}_images_per_s"]
            row["met"] = all(row[f"{p}_p50_delta_ms"] <= REQUEST_LOG_P50_TARGET_MS and
                             row[f"{p}_throughput_ratio"] >= REQUEST_LOG_THROUGHPUT_TARGET
                             for p in ("grpc", "rest"))
            rows.append(row)
    return rows


def request_log_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = ["", f"Request logs: medians over {args.rounds} round(s) of the unbatched "
             f"servers (goal: p50 within +{REQUEST_LOG_P50_TARGET_MS} ms and throughput "
             f"within {1 - REQUEST_LOG_THROUGHPUT_TARGET:.0%} of logging off)", "",
             f"| model | request log | gRPC p50 ms | REST p50 ms | gRPC {args.clients} "
             f"clients images/s | REST {args.clients} clients images/s | server CPU ms/image "
             "gRPC, REST | records written (dropped) | bytes/record | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["rate"] is None:
            lines.append(f"| {row['model']} | off | {row['grpc_p50_ms']:.2f} | "
                         f"{row['rest_p50_ms']:.2f} | {row['grpc_images_per_s']:,.0f} | "
                         f"{row['rest_images_per_s']:,.0f} | "
                         f"{row['grpc_server_cpu_ms_per_image']:.2f}, "
                         f"{row['rest_server_cpu_ms_per_image']:.2f} | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | sampling {row['rate']:g} | {row['grpc_p50_ms']:.2f} "
            f"({row['grpc_p50_delta_ms']:+.2f}) | {row['rest_p50_ms']:.2f} "
            f"({row['rest_p50_delta_ms']:+.2f}) | {row['grpc_images_per_s']:,.0f} "
            f"({row['grpc_throughput_ratio'] - 1:+.1%}) | {row['rest_images_per_s']:,.0f} "
            f"({row['rest_throughput_ratio'] - 1:+.1%}) | "
            f"{row['grpc_server_cpu_ms_per_image']:.2f}, "
            f"{row['rest_server_cpu_ms_per_image']:.2f} | {row['records']:,} "
            f"({row['dropped']}) | {row['bytes_per_record']:,.0f} | "
            f"{'met' if row['met'] else 'MISSED'} |")
    return lines


def check_targets(report: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    targets = []
    plain = report["servers"][0]
    batching = [server for server in report["servers"] if "--batching" in server["flags"]
                and "(before " not in server["config"]]
    batch_key = f"throughput_batch{args.max_batch_size}"
    for model in report["models"]:
        name = model["name"]
        floor = report["in_process"][name]
        gap = plain["models"][name]["grpc"]["p50_ms"] - floor["latency"]["p50_ms"]
        targets.append({"model": name, "target": f"gRPC p50 <= floor + {GRPC_P50_TARGET_MS} ms",
                        "value": f"{gap:+.2f} ms", "met": gap <= GRPC_P50_TARGET_MS})
        if batching:
            best = max(batching, key=lambda s: s["models"][name]["grpc"]["throughput"]
                       ["images_per_s"])
            rate = best["models"][name]["grpc"]["throughput"]["images_per_s"]
            ratio = rate / floor[batch_key]["images_per_s"]
            ceiling = transport_ceiling(report, name, batch_key)
            targets.append({"model": name,
                            "target": f"gRPC batching throughput >= "
                                      f"{BATCHING_THROUGHPUT_TARGET:.0%} of in-process at "
                                      f"batch {args.max_batch_size}",
                            "value": f"{ratio:.0%} ({best['config']}; transport ceiling "
                                     f"{ceiling['of_floor']:.0%})",
                            "met": ratio >= BATCHING_THROUGHPUT_TARGET,
                            "transport_ceiling": ceiling})
    return targets


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    machine = report["machine"]
    b = args.max_batch_size
    batch_key = f"throughput_batch{b}"
    lines = [f"nproc {machine['nproc']} ({machine['cpu'] or 'cpu ?'}), TF {machine['tensorflow']}"
             f", grpcio {machine['grpcio']}; {args.clients} clients = {args.client_procs} "
             f"processes x {args.clients // args.client_procs} threads; medians of "
             f"{args.latency_windows} latency windows (<= {args.latency_calls} calls) and "
             f"{args.throughput_windows} throughput windows of {args.throughput_window_s:g} s",
             "",
             f"| model (version) | path | server | batch-1 p50 ms | batch-1 p99 ms | "
             f"p50 - floor ms | {args.clients} clients images/s | / in-process b1 | "
             f"/ in-process b{b} | server cores (CPU ms/image) + client cores | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in report["models"]:
        name = model["name"]
        title = f"{name} (v{model['version']})"
        floor = report["in_process"][name]
        floor_p50 = floor["latency"]["p50_ms"]
        b1 = floor["throughput_batch1"]["images_per_s"]
        bb = floor[batch_key]["images_per_s"]
        cores = {key: f"{floor[key]['process_cores']:.2f} "
                      f"({floor[key]['cpu_ms_per_image']:.2f}) in one process"
                 for key in ("throughput_batch1", batch_key)}
        lines.append(f"| {title} | in-process (floor) | - | {floor_p50:.2f} | "
                     f"{floor['latency']['p99_ms']:.2f} | 0 | {b1:,.0f} (batch 1) | 1.00 | "
                     f"{b1 / bb:.2f} | {cores['throughput_batch1']} | 1 |")
        lines.append(f"| {title} | in-process (floor) | - | - | - | - | {bb:,.0f} (batch {b}) "
                     f"| {bb / b1:.2f} | 1.00 | {cores[batch_key]} | {b} |")
        echo = report["transport"][name]
        lines.append(f"| {title} | gRPC | echo server (transport alone, no model) | - | - | - | "
                     f"{echo['images_per_s']:,.0f} | - | - | {echo['server_cores']:.2f} "
                     f"({echo['server_cpu_ms_per_image']:.2f}) + {echo['client_cores']:.2f} "
                     f"({echo['client_cpu_ms_per_image']:.2f}) | - |")
        bare = report["bare"][name]
        lines.append(f"| {title} | gRPC | bare Python batching server (no checks, logs or "
                     f"metrics) | - | - | - | {bare['images_per_s']:,.0f} | "
                     f"{bare['images_per_s'] / b1:.2f} | {bare['images_per_s'] / bb:.2f} | "
                     f"{bare['server_cores']:.2f} ({bare['server_cpu_ms_per_image']:.2f}) + "
                     f"{bare['client_cores']:.2f} | - |")
        for server in report["servers"]:
            for protocol in ("grpc", "rest"):
                measured = server["models"][name][protocol]
                throughput = measured["throughput"]
                rate = throughput["images_per_s"]
                errors = f" ({throughput['errors']} errors)" if throughput["errors"] else ""
                label = server["config"]
                if args.log_rates and args.rounds > 1 and not server["flags"]:
                    label += f" (round {server['round'] + 1})"
                lines.append(
                    f"| {title} | {'gRPC' if protocol == 'grpc' else 'REST'} | "
                    f"{label} | {measured['p50_ms']:.2f} | {measured['p99_ms']:.2f} | "
                    f"{measured['p50_ms'] - floor_p50:+.2f} | {rate:,.0f}{errors} | "
                    f"{rate / b1:.2f} | {rate / bb:.2f} | "
                    f"{throughput['server_cores']:.2f} "
                    f"({throughput['server_cpu_ms_per_image']:.2f}) + "
                    f"{throughput['client_cores']:.2f} | "
                    f"{throughput.get('mean_batch_rows', 1):.1f} |")
    lines.append("")
    for target in report["targets"]:
        lines.append(f"- {target['model']}: {target['target']}: {target['value']} -> "
                     f"{'met' if target['met'] else 'MISSED'}")
    lines.append("")
    lines.append(f"Transport ceiling: {machine['usable_cpus']} cores / (in-process CPU ms per "
                 f"image at batch {b} + echo server and client CPU ms per request), the rate "
                 "if the model and the bare gRPC transport were all the work and no core "
                 "ever idled.")
    lines += request_log_markdown(report.get("request_logs", []), args)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - started
    print()
    print(report["markdown"])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
