"""Expected calibration error before and after temperature scaling, both models, synthetic data.

Runs the pipeline on a synthetic CSV (`fer-pipeline synth`'s generator, the demo's 4,000 rows
and seed by default) with the smoke profile, from ingest to evaluate, then reads what the
run recorded: each model's temperature with its validation NLL and ECE before and after
(models/<model>/training_info.json, "calibration"), and the test split's ECE and NLL before
and after, per model and for the ensemble rule (evaluation/evaluation.json). `--run DIR`
reads an existing run root instead of making one (a `make demo` run, for instance).

    .venv/bin/python benchmarks/calibration.py [--rows 4000] [--seed 0] [--profile smoke]
        [--run DIR] [--keep DIR]

Prints a table, the CPU (benchmarks/machine.py), the load average before and after, and a
final JSON line (`RESULT {...}`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_description  # noqa: E402

STEPS = "ingest,augment,statistics,validate,transform,train-cnn,train-vgg16,evaluate"
MODELS = ("cnn", "vgg16")


def make_run(rows: int, seed: int, profile: str, work: Path) -> tuple[Path, float]:
    """A fresh run root under `work`, and the pipeline's wall time in seconds."""
    from fer_pipeline.pipeline.synthetic import generate_csv

    data = work / "synthetic_fer2013.csv"
    generate_csv(str(data), rows=rows, seed=seed)
    run = work / "run"
    command = [str(Path(sys.executable).parent / "fer-pipeline"), "run", "--data", str(data),
               "--output", str(run), "--profile", profile, "--steps", STEPS]
    started = time.time()
    subprocess.run(command, check=True)
    return run, time.time() - started


def _committed(run: Path, step_directory: str) -> Path:
    """The execution directory a step's COMMIT.json names (core/artifacts.py)."""
    from fer_pipeline.core.artifacts import read_commit

    commit = read_commit(str(run / step_directory))
    if commit is None:
        raise SystemExit(f"{run / step_directory}: no committed output")
    return Path(commit.uri)


def read_run(run: Path) -> dict:
    evaluation = json.loads((_committed(run, "evaluation") / "evaluation.json").read_text())
    found: dict = {"models": {}, "ensemble": evaluation["ensemble"]["calibration"],
                   "test_examples": evaluation["data"]["test_examples"]}
    for model in MODELS:
        info = json.loads((_committed(run, f"models/{model}") / "training_info.json").read_text())
        tested = evaluation["models"][model]
        found["models"][model] = {
            "validation": info.get("calibration"),
            "test": {when: {k: tested["calibration"][when][k] for k in ("ece", "nll")}
                     for when in ("before", "after")},
            "test_accuracy": tested["accuracy"]}
    found["ensemble"] = {when: {k: found["ensemble"][when][k]
                                for k in ("ece", "nll", "accuracy", "human_review_rate")}
                         for when in ("before", "after")}
    return found


def table(found: dict) -> str:
    lines = ["| model | T | validation ECE before -> after | test ECE before -> after | "
             "test NLL before -> after | test accuracy |", "|---|---|---|---|---|---|"]
    for model, row in found["models"].items():
        fitted = row["validation"] or {}
        validation = (f"{fitted['before']['ece']:.3f} -> {fitted['after']['ece']:.3f}"
                      if fitted.get("calibrated") else "not calibrated")
        test = row["test"]
        lines.append(f"| {model} | {fitted.get('temperature', 1.0):.3f} | {validation} | "
                     f"{test['before']['ece']:.3f} -> {test['after']['ece']:.3f} | "
                     f"{test['before']['nll']:.3f} -> {test['after']['nll']:.3f} | "
                     f"{row['test_accuracy']:.3f} |")
    ensemble = found["ensemble"]
    lines.append(f"| ensemble rule | - | - | {ensemble['before']['ece']:.3f} -> "
                 f"{ensemble['after']['ece']:.3f} | {ensemble['before']['nll']:.3f} -> "
                 f"{ensemble['after']['nll']:.3f} | {ensemble['before']['accuracy']:.3f} -> "
                 f"{ensemble['after']['accuracy']:.3f} (review "
                 f"{ensemble['before']['human_review_rate']:.1%} -> "
                 f"{ensemble['after']['human_review_rate']:.1%}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="synthetic CSV rows (demo: 4000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (demo: 0)")
    parser.add_argument("--profile", default="smoke", choices=["smoke", "default"])
    parser.add_argument("--run", help="read this existing run root instead of making one")
    parser.add_argument("--keep", help="make the run here (kept) instead of a temporary dir")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    load_before = os.getloadavg()
    wall = None
    if args.run:
        run = Path(args.run)
    else:
        work = Path(args.keep or tempfile.mkdtemp(prefix="fer-calibration-"))
        work.mkdir(parents=True, exist_ok=True)
        run, wall = make_run(args.rows, args.seed, args.profile, work)
    found = read_run(run)
    load_after = os.getloadavg()
    print(table(found))
    print(f"CPU: {cpu_description()}; load average (1 min) {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after" + (f"; pipeline wall {wall:.0f} s" if wall else ""))
    print("RESULT " + json.dumps({**found, "run": str(run), "rows": args.rows,
                                  "profile": args.profile, "cpu": cpu_description(),
                                  "load_before": load_before, "load_after": load_after,
                                  "wall_s": wall}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
