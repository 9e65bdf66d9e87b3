"""`fer-pipeline monitor` at production size: its Beam job on the multi-processing DirectRunner.

    .venv/bin/python benchmarks/monitor.py [--requests 100000,1000000] [--json out.json]

The traffic is what a batch-1 client makes: each face sent once to each of the two served
models under one request id, one face per request, so 1,000,000 logged requests are
500,000 faces. Faces are synthetic (pipeline/synthetic.py; a pool of --pool distinct faces,
served again in random order to reach the count, so drawing them does not dominate the
set-up; each request has its own id, so a face served twice counts twice), answered by
the two real SavedModels of tests/monitor_fixtures.py, and logged as TF Serving
PredictionLogs (uint8 pixels, as the gRPC client sends them) in files of 10,000 records
(as a rotating server leaves them), --rate records a second. The largest size is written
once; each smaller size is its first files. The reference is built the same way the tests
build it (a 4,000-face train split, its TFDV statistics, test predictions).

Per size: the whole `run_monitor` wall time with the Beam flags given (default: the
multi-processing DirectRunner, 2 workers), records per second, and the peak resident
memory (VmRSS, sampled every 0.25 s from /proc) of the driver and of every process it
started (the Beam workers), and the ratio of those peaks between the largest and the
smallest size (flat: within 20 %). CPU model and the load average are printed beside the
figures: the machine is shared.

With `--engine flink` (or spark) the runs go to a local cluster (tools/local_cluster.py,
started by this script on free ports, parallelism 2, stopped at the end; `make engines`
must have fetched its jars): its daemons, job server, worker pool and the pool's Python
workers are this process's children, so their peaks are measured the same way, each
named (`processes`: the largest ones per size). `--logs DIR` keeps the logs in DIR (written
there when DIR has too few), so a second run or another engine reads the same ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from benchmarks.machine import cpu_description  # noqa: E402
from fer_pipeline.components.monitor import executor as monitor  # noqa: E402
from fer_pipeline.core.config import load_config  # noqa: E402
from tests import monitor_fixtures as fixtures  # noqa: E402

SCHEMA = "schemas/fer2013/schema.pbtxt"
RECORDS_PER_FILE = 10_000


def write_logs(directory: Path, faces: np.ndarray, answers: dict[str, np.ndarray],
               requests: int, seconds_per_request: float) -> list[str]:
    """`requests` batch-1 PredictionLogs (each face to every model), in rotated files."""
    directory.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).integers(0, len(faces), requests // len(answers))
    paths, writer, written = [], None, 0
    for i, face_index in enumerate(order):
        for name, probs in answers.items():
            if written % RECORDS_PER_FILE == 0:
                if writer:
                    writer.close()
                paths.append(str(directory / f"requests-{len(paths):05d}.tfrecord"))
                writer = tf.io.TFRecordWriter(paths[-1])
            entry = prediction_log_pb2.PredictionLog()
            spec = entry.log_metadata.model_spec
            spec.name, spec.signature_name = name, "serving_uint8"
            spec.version.value = fixtures.MODELS[name]
            entry.log_metadata.timestamp_secs = int(fixtures.START + i * seconds_per_request)
            entry.log_metadata.request_origin = f"bench-{i}"
            entry.predict_log.request.inputs["pixels"].CopyFrom(
                tf.make_tensor_proto(faces[face_index:face_index + 1]))
            entry.predict_log.response.outputs["probabilities"].CopyFrom(
                tf.make_tensor_proto(probs[face_index:face_index + 1]))
            writer.write(entry.SerializeToString())
            written += 1
    writer.close()
    return paths


def _rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _process_name(pid: int) -> str:
    """A short name for a process: a JVM's main class, or python and its module/command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    argv = [a for a in argv if a]
    if not argv:
        return "?"
    if os.path.basename(argv[0]) == "java":
        # The main class is the first word after the classpath that is not a flag.
        after = argv[argv.index("-cp") + 2:] if "-cp" in argv else argv[1:]
        mains = [a for a in after if not a.startswith("-")]
        return "java " + (mains[0].rsplit(".", 1)[-1] if mains else "?")
    if "-m" in argv[:-1]:
        return "python -m " + argv[argv.index("-m") + 1]
    if any("sdk_worker" in a for a in argv):
        return "python SDK worker"
    return " ".join(os.path.basename(a) for a in argv[:2])[:60]


class PeakMemory:
    """Peak VmRSS of this process and of each process it started, sampled in a thread."""

    def __init__(self) -> None:
        self.driver = 0.0
        self.others: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.driver = max(self.driver, _rss_mib(me))
            for pid in _descendants(me):
                self.others[pid] = max(self.others.get(pid, 0.0), _rss_mib(pid))
                if pid not in self.names:
                    self.names[pid] = _process_name(pid)
            self._stop.wait(0.25)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="100000,1000000",
                        help="logged requests per size, comma-separated (multiples of "
                             f"{RECORDS_PER_FILE})")
    parser.add_argument("--pool", type=int, default=2_000, help="distinct faces drawn")
    parser.add_argument("--rate", type=float, default=12.0, help="logged requests a second")
    parser.add_argument("--beam", default="--direct_running_mode=multi_processing "
                        "--direct_num_workers=2", help="the Beam flags of the runs")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--logs", help="keep the logs in this directory: reused when an "
                        "earlier run left enough there (the same --pool and --rate), else "
                        "written there")
    parser.add_argument("--engine", choices=["flink", "spark"],
                        help="run on a local cluster of this engine instead (--beam ignored)")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.requests.split(","))
    cluster = None
    if args.engine:
        from tools import local_cluster
        cluster = local_cluster.start(args.engine, Path(tempfile.mkdtemp(
            prefix=f"fer_{args.engine}_")), local_cluster.Ports.free(args.engine))
        args.beam = " ".join(cluster.beam_args(parallelism=2))
    try:
        measure(args, sizes)
    finally:
        if cluster is not None:
            local_cluster.stop(cluster)


def measure(args: argparse.Namespace, sizes: list[int]) -> None:
    """Every size's run_monitor with args.beam, printed (and written to args.json)."""
    root = Path(tempfile.mkdtemp(prefix="fer_monitor_bench_"))
    started = time.perf_counter()
    run = fixtures.build_served_run(str(root / "run"))
    if args.logs and len(list(Path(args.logs).glob("*.tfrecord"))) * RECORDS_PER_FILE \
            >= sizes[-1]:
        logs = sorted(str(p) for p in Path(args.logs).glob("*.tfrecord"))
    else:
        faces = fixtures.fresh_stream(args.pool, 303)
        answers = {name: fixtures.predict(path, faces) for name, path in run.models.items()}
        logs = write_logs(Path(args.logs) if args.logs else root / "logs", faces, answers,
                          sizes[-1], len(answers) / args.rate)
    print(f"logs: {Path(logs[0]).parent}", flush=True)
    setup_s = time.perf_counter() - started
    config = load_config().monitor
    figures: dict = {"cpu": cpu_description(), "beam_flags": args.beam,
                     "setup_s": round(setup_s, 1), "sizes": []}
    for size in sizes:
        files = logs[:size // RECORDS_PER_FILE]
        out = root / f"out_{size}"
        load = os.getloadavg()[0]
        begin = time.perf_counter()
        with PeakMemory() as memory:
            result = monitor.run_monitor(files, run.reference, SCHEMA, str(out), None, config,
                                         beam_args=args.beam.split())
        wall = time.perf_counter() - begin
        record = json.loads((out / "monitoring.json").read_text())
        workers = sorted(memory.others.values(), reverse=True)
        figures["sizes"].append({
            "requests": record["records"], "faces": record["faces"],
            "log_files": len(files),
            "log_mib": round(sum(os.path.getsize(p) for p in files) / 2 ** 20, 1),
            "windows": len(record["windows"]), "verdict": result.verdict,
            "run_monitor_s": round(wall, 1), "parts_s": record["timings_s"],
            "requests_per_s": round(record["records"] / wall),
            "driver_peak_mib": round(memory.driver), "largest_child_peak_mib":
                round(workers[0]) if workers else None,
            "children": len(workers), "join_partitions": record["job"]["partitions"],
            "processes": [{"name": memory.names.get(pid, "?"), "peak_mib": round(peak)}
                          for pid, peak in sorted(memory.others.items(),
                                                  key=lambda item: -item[1])[:8]],
            "load_average_1min_before": load})
        print(json.dumps(figures["sizes"][-1]), flush=True)
    first, last = figures["sizes"][0], figures["sizes"][-1]
    figures["driver_peak_ratio"] = round(last["driver_peak_mib"] / first["driver_peak_mib"], 3)
    if first["largest_child_peak_mib"] and last["largest_child_peak_mib"]:
        figures["child_peak_ratio"] = round(
            last["largest_child_peak_mib"] / first["largest_child_peak_mib"], 3)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
