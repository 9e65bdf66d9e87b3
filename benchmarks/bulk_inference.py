"""Bulk inference throughput: `fer-pipeline infer` on Beam beside fer-client over gRPC and the
in-process SavedModel call, in one run, on the same faces and model versions.

For N faces of a synthetic FER-2013 CSV (N = --faces, 35,887 for the full data set) and each
model's SavedModel, copied as version 1 into a serving root of this benchmark, this measures
(the models come from a pipeline run, `--run RUN`: its train steps' committed serving_model,
or with --untrained the registered architectures exported untrained with the run's
transform graph, the same graph and cost per image without waiting for training):

* `fer-pipeline infer` in its own process (Beam DirectRunner in-process, and with
  --multi-processing also on 2 worker processes): the whole job, CSV to the committed
  prediction shards, PredictionLogs and the ML Metadata record; "job s" is the job's own
  duration (inference.json), "process s" adds interpreter start-up and imports; "driver
  peak MiB" is the `fer-pipeline` process's peak resident memory (VmHWM, polled from
  /proc until it exits; with the DirectRunner in-process the job runs in it too);
* fer-client over gRPC: the CSV parsed by fer-client (`images_from_csv`), then
  `FerClient.predict` per model in batches of --client-batch faces against `fer-serve`
  (own process, 127.0.0.1, started before the clock; no server-side batching), then the
  ensemble rule per face, as `fer-client --csv` does;
* the in-process floor: the CSV parsed with numpy, each SavedModel loaded in this process
  and its `serving_uint8` signature called on batches of --batch faces, then
  `combine_batch`.

Every path's decisions are compared with the floor's (class and review flag per face).
`--paths` picks the paths (e.g. `infer` alone, to measure the driver's memory at another
size).

    .venv/bin/python benchmarks/bulk_inference.py --run RUN [--faces 35887] [--multi-processing]
        [--paths in-process,infer,client] [--out bench_runs/bulk_inference/bulk_inference.json]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.serving import ServerProcess, machine_facts  # noqa: E402
from fer_pipeline.core.config import MODEL_NAMES, EvalConfig  # noqa: E402
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE  # noqa: E402

BIN = Path(sys.executable).parent


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True,
                        help="a pipeline run root whose train steps (or, with --untrained, "
                             "transform step) committed their outputs")
    parser.add_argument("--untrained", action="store_true",
                        help="export the registered models untrained with the run's "
                             "transform graph instead of using trained ones")
    parser.add_argument("--faces", type=int, default=35887,
                        help="faces to score (synthetic FER-2013 rows)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--batch", type=int, default=256, help="in-process batch size")
    parser.add_argument("--client-batch", type=int, default=64,
                        help="faces per gRPC request of the fer-client path")
    parser.add_argument("--multi-processing", action="store_true",
                        help="also run infer on the DirectRunner's 2 worker processes")
    parser.add_argument("--paths", default="in-process,infer,client",
                        help="which paths to run: in-process, infer, client")
    parser.add_argument("--out", default="bench_runs/bulk_inference/bulk_inference.json")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    return parser.parse_args(argv)


def serving_root_from_run(run: str, models: list[str], root: str, untrained: bool
                          ) -> dict[str, str]:
    """Each model's SavedModel at ROOT/<model>/1, plus models.config: the run's committed
    serving_model, or (untrained) the registered architecture exported with the run's
    transform graph."""
    from fer_pipeline.components.pusher import write_serving_config
    from fer_pipeline.pipeline.runner import committed_output

    paths = {}
    for model in models:
        paths[model] = os.path.join(root, model, "1")
        if untrained:
            from fer_pipeline.core.serving_export import export_serving_model
            from fer_pipeline.components.trainer.models import build_model
            from fer_pipeline.core.config import TrainConfig

            export_serving_model(build_model(model, TrainConfig(), jit_compile=False),
                                 committed_output(run, "transform.transform_graph"),
                                 paths[model])
        else:
            shutil.copytree(committed_output(run, f"train-{model}.serving_model"),
                            paths[model])
    write_serving_config(root)
    return paths


def read_faces(path: str) -> np.ndarray:
    """uint8 [n, 48, 48], parsed row by row into one array (no list of rows at 200,000)."""
    with open(path, newline="") as handle:
        rows = sum(1 for _ in handle) - 1
    faces = np.empty((rows, IMAGE_SIZE * IMAGE_SIZE), np.uint8)
    with open(path, newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            faces[index] = np.array(row["pixels"].split(), np.uint8)
    return faces.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def in_process(data: str, paths: dict[str, str], batch: int, tolerance: float
               ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The floor: parse, call each model's serving_uint8 in batches, combine."""
    import tensorflow as tf

    from fer_pipeline.core.ensemble import combine_batch

    loaded = {m: tf.saved_model.load(p).signatures["serving_uint8"] for m, p in paths.items()}
    for signature in loaded.values():        # first call (graph warm-up) off the clock
        signature(pixels=tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE], tf.uint8))
    started, cpu = time.perf_counter(), time.process_time()
    faces = read_faces(data)
    probabilities = {m: np.concatenate([
        signature(pixels=tf.constant(faces[i:i + batch]))["probabilities"].numpy()
        for i in range(0, len(faces), batch)]) for m, signature in loaded.items()}
    class_ids, _, review = combine_batch(probabilities, tolerance)
    seconds = time.perf_counter() - started
    return ({"path": f"in-process SavedModel, serving_uint8, batch {batch}",
             "seconds": round(seconds, 2), "images_per_s": round(len(faces) / seconds, 1),
             "cpu_s": round(time.process_time() - cpu, 1)}, class_ids, review)


def fer_client(data: str, config: str, faces: int, batch: int, models: list[str],
               tolerance: float, log: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """fer-client's path over gRPC against fer-serve, in batches of `batch` faces."""
    from fer_pipeline.serving.client import FerClient, classify
    from fer_pipeline.serving.client_cli import images_from_csv

    server = ServerProcess(config, log, [])
    try:
        client = FerClient("127.0.0.1", grpc_port=server.grpc_port, timeout=600)
        client.predict(models[0], np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
        server_cpu = server.cpu_seconds()
        started, cpu = time.perf_counter(), time.process_time()
        images = np.stack([item.pixels for item in images_from_csv(data, faces)])
        results = []
        for i in range(0, len(images), batch):
            results += classify(client, images[i:i + batch], models, tolerance)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu
        server_cpu = server.cpu_seconds() - server_cpu
    finally:
        server.stop()
    class_ids = np.array([r["decision"]["class_id"] for r in results])
    review = np.array([r["decision"]["needs_human_review"] for r in results])
    return ({"path": f"fer-client over gRPC, fer-serve, {batch} faces per request",
             "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 1),
             "cpu_s": round(client_cpu + server_cpu, 1)}, class_ids, review)


class PeakMemory:
    """Polls a process's VmHWM (the kernel's record of its peak resident set) every 50 ms
    until it exits; `peak_mib` is the last value read."""

    def __init__(self, pid: int) -> None:
        import threading

        self.peak_mib = 0.0
        self._path = f"/proc/{pid}/status"
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            try:
                text = Path(self._path).read_text()
            except OSError:
                return   # it exited
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_mib = max(self.peak_mib, int(line.split()[1]) / 1024)
            time.sleep(0.05)

    def join(self) -> float:
        self._thread.join()
        return self.peak_mib


def bulk_infer(data: str, root: str, output: str, models: list[str], beam_args: list[str],
               label: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """`fer-pipeline infer` in its own process; decisions read back from the committed
    prediction shards, sorted into the CSV's order."""
    from fer_pipeline.components.bulk_inferrer import csv_rows, prediction_order, read_committed
    from fer_pipeline.components.bulk_inferrer.outputs import shard_pattern

    command = [str(BIN / "fer-pipeline"), "infer", "--data", data, "--output", output,
               "--serving-root", root, "--models", ",".join(models), *beam_args]
    started, children = time.perf_counter(), _children_cpu()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    memory = PeakMemory(process.pid)
    _, stderr = process.communicate()   # the driver's /proc entry stays until it is reaped
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - children   # the process and its Beam workers, imports included
    peak_mib = memory.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    committed = read_committed(output)
    result = committed.manifest["result"]
    rows = sorted(csv_rows(shard_pattern(committed.uri, "predictions")), key=prediction_order)
    class_ids = np.array([CLASS_NAMES.index(r["decision"]) for r in rows])
    review = np.array([r["needs_review"] == "yes" for r in rows])
    faces = result["faces_scored"]
    return ({"path": label, "seconds": round(result["seconds"], 2),
             "images_per_s": round(faces / result["seconds"], 1),
             "process_s": round(seconds, 2), "cpu_s": round(cpu, 1),
             "process_images_per_s": round(faces / seconds, 1),
             "driver_peak_mib": round(peak_mib),
             "prediction_shards": len(glob.glob(shard_pattern(committed.uri, "predictions")))},
            class_ids, review)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from fer_pipeline.pipeline.synthetic import generate_csv

    models = args.models.split(",")
    tolerance = EvalConfig().tie_tolerance
    work = args.work or tempfile.mkdtemp(prefix="bench_bulk_")
    data = os.path.join(work, "faces.csv")
    generate_csv(data, rows=args.faces, seed=11)
    root = os.path.join(work, "serving")
    shutil.rmtree(root, ignore_errors=True)
    paths = serving_root_from_run(args.run, models, root, args.untrained)
    facts = machine_facts()
    print(f"{args.faces} faces, models {models}, {facts['cpu']}, load {facts['loadavg_at_start']}",
          flush=True)

    wanted = set(args.paths.split(","))
    rows, decisions, names = [], {}, []
    floor = None
    if "in-process" in wanted:
        floor, class_ids, review = in_process(data, paths, args.batch, tolerance)
        decisions["in-process"] = (class_ids, review)
        rows.append(floor)
        names.append("in-process")
        print(floor, flush=True)
    runs = ([("direct", [], "fer-pipeline infer, Beam DirectRunner in-process")]
            if "infer" in wanted else [])
    if args.multi_processing:
        runs.append(("multi", ["--direct_running_mode=multi_processing",
                               "--direct_num_workers=2"],
                     "fer-pipeline infer, Beam DirectRunner, 2 worker processes"))
    for name, beam_args, label in runs:
        row, class_ids, review = bulk_infer(data, root, os.path.join(work, f"out_{name}"),
                                            models, beam_args, label)
        decisions[name] = (class_ids, review)
        rows.append(row)
        names.append(name)
        print(row, flush=True)
    if "client" in wanted:
        client, class_ids, review = fer_client(data, os.path.join(root, "models.config"),
                                               args.faces, args.client_batch, models,
                                               tolerance, os.path.join(work, "fer-serve.log"))
        decisions["client"] = (class_ids, review)
        rows.append(client)
        names.append("client")
        print(client, flush=True)

    reference = decisions.get("in-process")
    for row, name in zip(rows, names):
        row["decisions_equal_floor"] = reference is not None and bool(
            np.array_equal(decisions[name][0], reference[0])
            and np.array_equal(decisions[name][1], reference[1]))
        row["vs_floor"] = (round(row["images_per_s"] / floor["images_per_s"], 2)
                           if floor else None)
        row["cpu_ms_per_image"] = round(1000 * row["cpu_s"] / args.faces, 1)
    report = {"faces": args.faces, "untrained": args.untrained,
              "models": {m: p for m, p in paths.items()},
              "machine": facts, "loadavg_at_end": list(os.getloadavg()), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n| path | s | images/s | / in-process | CPU ms/image | decisions equal | "
          "driver peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['path']} | {row['seconds']} | {row['images_per_s']:,} | "
              f"{row['vs_floor']} | {row['cpu_ms_per_image']} | "
              f"{'yes' if row['decisions_equal_floor'] else 'NO'} | "
              f"{row.get('driver_peak_mib', '')} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
