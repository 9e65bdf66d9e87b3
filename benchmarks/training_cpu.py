"""CPU benchmark of the training half: tf.data input throughput and training step rate.

Measures, on this machine's CPU:

1. the trainer's input pipeline (fer_pipeline.core.training_data.make_dataset, imported, with the
   trainer's arguments: training=True, TrainConfig's seed and shuffle_buffer, the split's
   record count as cardinality) over the Transform step's train split, in images/s:
   the first epoch (read the TFRecords, parse, fill the in-memory cache; files are in the
   OS page cache, not cold disk) and the cached epochs after it (median), at the notebook
   batch sizes (CNN 70, VGG16 65). Each setting runs in its own process pinned to 1 core
   and to all cores (os.sched_setaffinity before TensorFlow is imported, TF intra/inter-op
   threads, tf.data's private_threadpool_size and autotune cpu_budget all set to that
   number), so the figure can be given per core. tf.data is drained inside TensorFlow
   (Dataset.reduce), so no per-batch Python is measured;
2. full training steps (forward, backward, Adam) of both models as built by
   fer_pipeline.components.trainer.models.build_model with the trainer's settings (TrainConfig defaults:
   float32, jit_compile=TrainConfig.xla, model.fit, steps_per_execution 1) at the notebook
   batch sizes, VGG16 with its base frozen (the pretrained-weights case; the 1x1
   grey-to-RGB conv before the base still trains, so gradients still flow back through the
   base) and trainable (the random-init default, vgg16_base_is_trainable). The batches are
   in memory (one real batch of the transformed train split, from_tensors().repeat()), so
   the input pipeline is not in the measurement; images/s is the median over timed windows
   of consecutive steps after warm-up steps (the first traces the step function);
3. the ratio: cores of tf.data needed per training process (step images/s / tf.data
   images/s per core, measured on 1 core), and its inverse.

Input: --transform-dir, a Transform step output (transformed/<split>/*.tfrecord and
transform_graph/). Without it: bench_runs/data_half/run_<rows>/transform when that exists
(written by benchmarks/data_half.py), otherwise one is produced with the project's CLI:
`fer-pipeline synth --rows N` then `fer-pipeline run --steps
ingest,statistics,validate,augment,transform` under --out.

    .venv/bin/python benchmarks/training_cpu.py [--transform-dir DIR] [--rows 35887]
        [--out DIR] [--quick]

Prints markdown tables (for docs/benchmarks.md) and writes <out>/results.json; one run,
medians. --quick (the smoke test) shrinks batches, epochs and windows to seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402
from fer_pipeline.core.config import TrainConfig  # noqa: E402

BIN = Path(sys.executable).parent
DATA_STEPS = "ingest,statistics,validate,augment,transform"
MODELS = (("cnn", None), ("vgg16", "frozen"), ("vgg16", "trainable"))

# Full run: per batch size, 1 first epoch + CACHED_EPOCHS; per model, warm-up steps, then
# windows of consecutive steps (VGG16 steps take seconds on 2 cores, hence fewer).
FULL = {"cached_epochs": 5,
        "train": {"cnn": {"warmup": 3, "windows": 5, "window_steps": 10},
                  "vgg16": {"warmup": 2, "windows": 5, "window_steps": 2}},
        "train_batch": None}
QUICK = {"cached_epochs": 1,
         "train": {"cnn": {"warmup": 1, "windows": 2, "window_steps": 2},
                   "vgg16": {"warmup": 1, "windows": 2, "window_steps": 1}},
         "train_batch": 4}


# ------------------------------------------------------------------------------ workers
# Both run in child processes: the input worker must pin its CPUs before TF starts.

def _import_tf(cores: int | None):
    if cores:
        available = sorted(os.sched_getaffinity(0))
        if cores > len(available):
            raise SystemExit(f"asked for {cores} cores, {len(available)} available")
        os.sched_setaffinity(0, set(available[:cores]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow as tf
    if cores:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(cores)
    return tf


def _train_pattern(transform_dir: str, split: str = "train") -> str:
    from fer_pipeline.core.contract import EXAMPLES_PATTERN, TRANSFORMED_DIR
    return os.path.join(transform_dir, TRANSFORMED_DIR, split, EXAMPLES_PATTERN)


def input_worker(args) -> dict:
    """tf.data images/s of make_dataset at each batch size, on `args.cores` cores."""
    tf = _import_tf(args.cores)
    import gc

    import numpy as np

    from fer_pipeline.core.training_data import count_records, make_dataset

    config = TrainConfig()
    pattern = _train_pattern(args.transform_dir)
    count = count_records(pattern)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.cores
    options.autotune.cpu_budget = args.cores

    def drain(ds) -> tuple[int, float]:
        start = time.perf_counter()
        n = ds.reduce(np.int64(0),
                      lambda n, batch: n + tf.shape(batch[1], out_type=tf.int64)[0])
        return int(n), time.perf_counter() - start

    rows = []
    for batch_size in args.batch_sizes:
        ds = make_dataset(pattern, batch_size, training=True, seed=config.seed,
                          shuffle_buffer=config.shuffle_buffer, num_examples=count)
        ds = ds.with_options(options)
        epochs = [drain(ds) for _ in range(1 + args.cached_epochs)]
        if any(n != count for n, _ in epochs):
            raise RuntimeError(f"an epoch delivered {[n for n, _ in epochs]}, not {count}")
        first_s = epochs[0][1]
        cached_s = [s for _, s in epochs[1:]]
        rows.append({"batch_size": batch_size, "cores": args.cores, "images": count,
                     "first_epoch_s": first_s, "first_epoch_images_per_s": count / first_s,
                     "cached_epoch_s": cached_s,
                     "cached_images_per_s": statistics.median(count / s for s in cached_s)})
        del ds
        gc.collect()
    return {"rows": rows, "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg_end": os.getloadavg()}


class _StepTimer:
    """Keras callback factory: perf_counter at the end of every training batch."""

    @staticmethod
    def make(keras):
        class StepTimer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.begin = 0.0
                self.ends: list[float] = []

            def on_train_begin(self, logs=None):
                self.begin = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())
        return StepTimer()


def train_worker(args) -> dict:
    """Training-step images/s of each model on in-memory batches, all cores."""
    tf = _import_tf(None)
    import dataclasses

    import keras

    from fer_pipeline.components.trainer.models import build_model, model_config, vgg16_base_is_trainable
    from fer_pipeline.core.training_data import make_dataset

    plan = json.loads(args.plan)
    base_config = TrainConfig()
    pattern = _train_pattern(args.transform_dir)
    rows = []
    for name, variant in MODELS:
        config = base_config
        if variant:
            section = dataclasses.replace(
                model_config(name, config), train_base="false" if variant == "frozen" else "true")
            config = dataclasses.replace(config, models={**config.models, name: section})
        if plan["train_batch"]:
            section = dataclasses.replace(model_config(name, config),
                                          batch_size=plan["train_batch"])
            config = dataclasses.replace(config, models={**config.models, name: section})
        batch_size = model_config(name, config).batch_size
        steps = plan["train"][name]
        keras.utils.set_random_seed(config.seed)
        model = build_model(name, config, jit_compile=config.xla)
        # One real batch of transformed images, held in memory and handed over every step.
        x, y = next(iter(make_dataset(pattern, batch_size, training=False,
                                      seed=config.seed)))
        data = tf.data.Dataset.from_tensors((x, y)).repeat()
        timer = _StepTimer.make(keras)
        total = steps["warmup"] + steps["windows"] * steps["window_steps"]
        start = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=total, verbose=0, shuffle=False,
                  callbacks=[timer])
        fit_s = time.perf_counter() - start
        ends = timer.ends
        if len(ends) != total:
            raise RuntimeError(f"{name}: {len(ends)} batch ends, expected {total}")
        windows = []
        for w in range(steps["windows"]):
            first = steps["warmup"] + w * steps["window_steps"]  # index of the window's 1st step
            seconds = ends[first + steps["window_steps"] - 1] - ends[first - 1]
            windows.append(steps["window_steps"] * batch_size / seconds)
        trainable = sum(int(v.numpy().size) for v in model.trainable_variables)
        frozen = sum(int(v.numpy().size) for v in model.non_trainable_variables)
        rows.append({
            "model": name,
            "variant": variant or "",
            "vgg16_base_trainable": (vgg16_base_is_trainable(model_config(name, config).weights,
                                                             model_config(name, config).train_base)
                                     if name == "vgg16" else None),
            "batch_size": batch_size,
            "learning_rate_config": model_config(name, config).learning_rate,
            "warmup_steps": steps["warmup"], "windows": steps["windows"],
            "window_steps": steps["window_steps"],
            "first_step_s": ends[0] - timer.begin,
            "window_images_per_s": windows,
            "images_per_s": statistics.median(windows),
            "step_s": batch_size / statistics.median(windows),
            "fit_wall_s": fit_s,
            "trainable_params": trainable, "non_trainable_params": frozen,
        })
        del model
        keras.backend.clear_session()
    return {"rows": rows, "jit_compile": base_config.xla,
            "precision": "float32" if not base_config.mixed_precision else "mixed",
            "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                        "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            "loadavg_end": os.getloadavg()}


def run_worker(kind: str, args: list[str]) -> tuple[dict, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                           "--result", result_path, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return result, wall


# --------------------------------------------------------------------------- orchestration

def produce_transform_dir(rows: int, work: Path) -> Path:
    """The data half through the project's CLI; returns <run>/transform."""
    reused = ROOT / "bench_runs" / "data_half" / f"run_{rows}" / "transform"
    if (reused / "manifest.json").exists():
        return reused
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"fer_{rows}.csv"
    if not csv_path.exists():
        subprocess.run([str(BIN / "fer-pipeline"), "synth", "--rows", str(rows),
                        "--out", str(csv_path)], check=True)
    run_root = work / f"run_{rows}"
    subprocess.run([str(BIN / "fer-pipeline"), "run", "--steps", DATA_STEPS,
                    "--data", str(csv_path), "--output", str(run_root)], check=True)
    return run_root / "transform"


def machine_facts() -> dict:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu": cpu_description(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def ratios(report: dict) -> list[dict]:
    """Per model: how many cores of tf.data one training process needs at its batch size."""
    inputs = {(r["batch_size"], r["cores"]): r for r in report["input"]}
    out = []
    for t in report["training"]:
        one = inputs.get((t["batch_size"], 1))
        if one is None:  # --quick trains at a batch size tf.data was not measured at
            candidates = [r for r in report["input"] if r["cores"] == 1]
            one = min(candidates, key=lambda r: abs(r["batch_size"] - t["batch_size"]))
        out.append({
            "model": t["model"], "variant": t["variant"], "batch_size": t["batch_size"],
            "input_batch_size": one["batch_size"],
            "step_images_per_s": t["images_per_s"],
            "input_cached_images_per_s_1core": one["cached_images_per_s"],
            "input_first_epoch_images_per_s_1core": one["first_epoch_images_per_s"],
            "cores_needed_cached": t["images_per_s"] / one["cached_images_per_s"],
            "cores_needed_first_epoch": t["images_per_s"] / one["first_epoch_images_per_s"],
            "processes_fed_per_core": one["cached_images_per_s"] / t["images_per_s"],
        })
    return out


def _label(row: dict) -> str:
    if row["model"] == "vgg16":
        return f"vgg16, base {row['variant']}"
    return row["model"]


def to_markdown(report: dict) -> str:
    n = report["machine"]["cpus_usable"]
    lines = ["| measurement | batch | cores | images/s | images/s per core |",
             "|---|---|---|---|---|"]
    cached_n = report["plan"]["cached_epochs"]
    for r in sorted(report["input"], key=lambda r: (-r["batch_size"], r["cores"])):
        c = r["cores"]
        lines.append(f"| tf.data make_dataset, first epoch (read + parse + cache) | "
                     f"{r['batch_size']} | {c} | {r['first_epoch_images_per_s']:,.0f} | "
                     f"{r['first_epoch_images_per_s'] / c:,.0f} |")
        lines.append(f"| tf.data make_dataset, cached epochs (median of {cached_n}) | "
                     f"{r['batch_size']} | {c} | {r['cached_images_per_s']:,.0f} | "
                     f"{r['cached_images_per_s'] / c:,.0f} |")
    for t in report["training"]:
        lines.append(f"| training step, {_label(t)} (fit, in-memory batch; median of "
                     f"{t['windows']} x {t['window_steps']} steps) | {t['batch_size']} | {n} | "
                     f"{t['images_per_s']:,.1f} | {t['images_per_s'] / n:,.1f} |")
    lines += ["", "| model | batch | step images/s | tf.data images/s on 1 core (cached / "
              "first epoch) | tf.data cores per training process (cached / first epoch) | "
              "training processes one tf.data core feeds (cached) |",
              "|---|---|---|---|---|---|"]
    for q in report["ratios"]:
        lines.append(
            f"| {_label(q)} | {q['batch_size']} | {q['step_images_per_s']:,.1f} | "
            f"{q['input_cached_images_per_s_1core']:,.0f} / "
            f"{q['input_first_epoch_images_per_s_1core']:,.0f} | "
            f"{q['cores_needed_cached']:.4f} / {q['cores_needed_first_epoch']:.4f} | "
            f"{q['processes_fed_per_core']:,.0f} |")
    m = report["machine"]
    lines.append(f"\n{m['cpu']}, {m['memory_gib']} GiB; "
                 f"TF {report['versions']['tensorflow']}, Keras {report['versions']['keras']}, "
                 f"Python {m['python']}; {report['input_images']:,} training images "
                 f"(transformed train split); load average before: "
                 f"{report['loadavg_start'][0]:.2f}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transform-dir", help="Transform step output (default: see above)")
    parser.add_argument("--rows", type=int, default=35887,
                        help="synthetic CSV rows when no --transform-dir is given")
    parser.add_argument("--out", default=str(ROOT / "bench_runs" / "training_cpu"),
                        help="writes results.json here (and the generated data, if any)")
    parser.add_argument("--quick", action="store_true", help="seconds, for the smoke test")
    parser.add_argument("--cores", default="",
                        help="comma-separated core counts for tf.data (default: 1 and all)")
    # internal: worker processes
    parser.add_argument("--worker", choices=["input", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", help=argparse.SUPPRESS)
    parser.add_argument("--cached-epochs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.cores = int(args.cores) if args.cores else None
        args.batch_sizes = [int(b) for b in (args.batch_sizes or "").split(",") if b]
        result = input_worker(args) if args.worker == "input" else train_worker(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    transform_dir = Path(args.transform_dir) if args.transform_dir else \
        produce_transform_dir(args.rows, out)
    if not (transform_dir / "transformed" / "train").is_dir():
        raise SystemExit(f"{transform_dir} has no transformed/train")
    machine = machine_facts()
    usable = machine["cpus_usable"]
    cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted({1, usable})
    notebook = TrainConfig()
    batch_sizes = [notebook.models[m].batch_size for m in ("cnn", "vgg16")]
    if args.quick:
        batch_sizes = batch_sizes[:1]

    report = {"machine": machine, "quick": args.quick, "plan": plan,
              "transform_dir": str(transform_dir.resolve()),
              "loadavg_start": os.getloadavg(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "input": [], "phases": {}}
    for n in cores:
        result, wall = run_worker("input", [
            "--transform-dir", str(transform_dir), "--cores", str(n),
            "--batch-sizes", ",".join(map(str, batch_sizes)),
            "--cached-epochs", str(plan["cached_epochs"])])
        report["input"] += result["rows"]
        report["phases"][f"input_{n}core"] = {"wall_s": wall, "affinity": result["affinity"],
                                              "loadavg_end": result["loadavg_end"]}
        print(f"[training_cpu] tf.data on {n} core(s): done in {wall:.0f} s", flush=True)
    result, wall = run_worker("train", ["--transform-dir", str(transform_dir),
                                        "--plan", json.dumps(plan)])
    report["training"] = result["rows"]
    report["phases"]["train"] = {"wall_s": wall, "threads": result["threads"],
                                 "loadavg_end": result["loadavg_end"]}
    print(f"[training_cpu] training steps: done in {wall:.0f} s", flush=True)
    report.update(jit_compile=result["jit_compile"], precision=result["precision"],
                  versions={**result["versions"], "python": machine["python"]},
                  input_images=report["input"][0]["images"])
    report["ratios"] = ratios(report)
    report["loadavg_end"] = os.getloadavg()
    report["markdown"] = to_markdown(report)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
