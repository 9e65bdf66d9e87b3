"""Tuning benchmark: one tune step (components/tuner/) on synthetic faces, timed, with the
best trial's validation accuracy against the declared defaults'.

Input: --transform-dir, a Transform step output; without it one is produced with the
project's CLI from `fer-pipeline synth --rows N` (benchmarks/training_cpu.py does the same).
The model is the smoke profile's CNN; the budget is --tuner, --trials, --epochs and
--examples (faces per trial epoch); --workers N runs the distributed search.

    .venv/bin/python benchmarks/tuning.py [--transform-dir DIR] [--rows 2400] [--out DIR]
        [--tuner random] [--trials 4] [--epochs 2] [--examples 1000] [--workers 0]

Prints a markdown table for docs/benchmarks.md and writes <out>/tuning.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description  # noqa: E402
from training_cpu import produce_transform_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform-dir")
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--out", default=str(ROOT / "bench_runs" / "tuning"))
    parser.add_argument("--tuner", default="random", choices=["random", "bayesian", "hyperband"])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    from fer_pipeline.core import quiet
    quiet.install()
    from fer_pipeline.components.tuner import run_tuner
    from fer_pipeline.core.config import load_config

    out = Path(args.out)
    transform = args.transform_dir
    if not transform:   # the committed output of the run produce_transform_dir made
        from fer_pipeline.pipeline.runner import committed_output
        run_root = produce_transform_dir(args.rows, out / "data").parent
        transform = committed_output(str(run_root), "transform.transform")
    config = load_config(profile="smoke", overrides={"tune": {
        "tuner": args.tuner, "max_trials": args.trials, "epochs_per_trial": args.epochs,
        "max_train_examples": args.examples}})
    started = time.perf_counter()
    result = run_tuner(transform, str(out / f"tune_{int(time.time())}"), config.tune,
                       config.train, "cnn", workers=args.workers)
    seconds = time.perf_counter() - started
    report = {"cpu": cpu_description(), "tuner": args.tuner, "trials": result.trials,
              "epochs_per_trial": args.epochs, "faces_per_epoch": args.examples,
              "workers": args.workers, "seconds": round(seconds, 1),
              "best_val_accuracy": result.best_val_accuracy,
              "default_val_accuracy": result.default_val_accuracy, "kept": result.source,
              "hyperparameters": result.hyperparameters, "summary": result.summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(report, indent=2))
    print(f"CPU: {report['cpu']}\n")
    print("| tuner | trials x epochs (faces/epoch) | workers | time | best trial val acc | "
          "defaults val acc | kept |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.tuner} | {result.trials} x {args.epochs} ({args.examples}) | "
          f"{args.workers} | {seconds:.0f} s | {result.best_val_accuracy:.3f} | "
          f"{result.default_val_accuracy:.3f} | {result.source} |")
    print(f"\n{result.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
