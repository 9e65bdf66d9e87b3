"""TensorFlow with and without oneDNN's CPU kernels: training steps and inference latency.

TensorFlow's Linux x86 wheels turn oneDNN on by default only on CPUs with AVX-512 VNNI or
BF16, AVX-VNNI or AMX; our processes ask for it everywhere (core/tf_cpu.py). This
measures what that choice does on the machine it runs on, for both models as
fer_pipeline.components.trainer.models builds them with the smoke profile's settings (the trainer's compile:
Adam, jit_compile "auto"):

- a training step (model.fit over one in-memory batch repeated, so no input pipeline is
  measured) at batch 32, ms per step: the median of timed windows after warm-up;
- inference through a tf.function at batch 1 and batch 32, ms per call (median).

Each setting runs in its own process (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at
import), paired A B A B so drift on a shared machine falls on both. Weights are random:
the cost of a step does not depend on them.

    .venv/bin/python benchmarks/onednn.py [--pairs 3] [--quick]

Prints a markdown table (medians over the pairs, and the ratio off/on) with the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402

SETTINGS = {"off": "0", "on": "1"}
FULL = {"warmup": 3, "windows": 5, "window_steps": {"cnn": 10, "vgg16": 2}, "calls": 20}
QUICK = {"warmup": 1, "windows": 1, "window_steps": {"cnn": 1, "vgg16": 1}, "calls": 2}


def measure(sizes: dict) -> dict:
    """Runs in the child: every figure for both models under the inherited setting."""
    import dataclasses
    import time

    import numpy as np
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from fer_pipeline.components.trainer.models import build_cnn, build_vgg16
    from fer_pipeline.core.config import MODEL_REGISTRY

    def smoke_config(name):
        entry = MODEL_REGISTRY[name]
        return dataclasses.replace(entry.defaults, **entry.smoke)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 2304)).astype("float32")
    labels = rng.integers(0, 7, size=32)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    figures = {"onednn": bool(_pywrap_util_port.IsMklEnabled())}
    for name, build in (("cnn", build_cnn), ("vgg16", build_vgg16)):
        model = build(smoke_config(name))
        steps = sizes["window_steps"][name]
        model.fit(batches, steps_per_epoch=sizes["warmup"], epochs=1, verbose=0)
        windows = []
        for _ in range(sizes["windows"]):
            start = time.perf_counter()
            model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
            windows.append(1000 * (time.perf_counter() - start) / steps)
        figures[f"{name} train step, batch 32"] = statistics.median(windows)
        predict = tf.function(lambda x, model=model: model(x, training=False))
        for batch in (1, 32):
            x = tf.constant(images[:batch])
            predict(x)
            calls = []
            for _ in range(sizes["calls"]):
                start = time.perf_counter()
                predict(x).numpy()
                calls.append(1000 * (time.perf_counter() - start))
            figures[f"{name} inference, batch {batch}"] = statistics.median(calls)
    return figures


def run_child(setting: str, sizes: dict) -> dict:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=SETTINGS[setting], TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="", KERAS_BACKEND="tensorflow")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(sizes)], env=env,
                         cwd=ROOT, capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if figures.pop("onednn") != (setting == "on"):
        raise RuntimeError(f"TF_ENABLE_ONEDNN_OPTS={SETTINGS[setting]} did not take effect")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="seconds, for the smoke test")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    sizes = QUICK if args.quick else FULL
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.pairs):
        for setting in ("off", "on"):
            runs[setting].append(run_child(setting, sizes))
    print(f"CPU: {cpu_description()}; {args.pairs} pairs (A B A B), medians, ms\n")
    print("| measure | oneDNN off | oneDNN on | off / on |")
    print("|---|---|---|---|")
    for measure_name in runs["off"][0]:
        off = statistics.median(r[measure_name] for r in runs["off"])
        on = statistics.median(r[measure_name] for r in runs["on"])
        print(f"| {measure_name} | {off:.1f} | {on:.1f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
