"""Benchmark: ingesting labelled image folders against the same faces as a CSV.

Writes a synthetic FER-2013 CSV (pipeline/synthetic.py, 35,887 rows by default) and the
same faces as 48x48 PNGs in the Kaggle image edition's layout (train/<class>/ for Training,
test/<class>/ for PublicTest and PrivateTest), then times `fer-pipeline ingest` on each,
alternating, as its own process (the step's duration from its manifest, and the process's
wall time). Reports medians and the ratio image tree / CSV.

    .venv/bin/python benchmarks/image_ingest.py [--rows 35887] [--repeats 3] [--out DIR]
        [beam flags, e.g. --direct_running_mode=multi_processing --direct_num_workers=2]

Prints a markdown table (pasted into docs/benchmarks.md) and writes results.json in --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_description  # noqa: E402

BIN = Path(sys.executable).parent
KAGGLE_FOLDER = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}


def write_inputs(rows: int, work: Path) -> tuple[Path, Path]:
    """The synthetic CSV and the same faces as a Kaggle-layout PNG tree."""
    import cv2
    from fer_pipeline.core.contract import CLASS_NAMES
    from fer_pipeline.pipeline.synthetic import generate_csv

    csv_path, tree = work / f"fer_{rows}.csv", work / f"fer_{rows}_images"
    if not csv_path.exists():
        generate_csv(str(csv_path), rows)
    if not (tree / "done").exists():
        shutil.rmtree(tree, ignore_errors=True)
        with open(csv_path, newline="") as f:
            for index, row in enumerate(csv.DictReader(f)):
                folder = tree / KAGGLE_FOLDER[row["Usage"]] / CLASS_NAMES[int(row["emotion"])]
                folder.mkdir(parents=True, exist_ok=True)
                face = np.array(row["pixels"].split(), np.uint8).reshape(48, 48)
                cv2.imwrite(str(folder / f"{index:05d}.png"), face)
        (tree / "done").write_text("")
    return csv_path, tree


def ingest_once(data: Path, run_root: Path, beam_args: list[str]) -> dict:
    shutil.rmtree(run_root, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([str(BIN / "fer-pipeline"), "ingest", "--data", str(data), "--output",
                    str(run_root), *beam_args], check=True, capture_output=True)
    wall = time.perf_counter() - started
    # The committed step's record (its manifest sits in the execution folder it names).
    manifest = json.loads((run_root / "examples" / "COMMIT.json").read_text())["manifest"]
    written = sum(manifest["result"]["rows_written"].values())
    return {"wall_s": wall, "step_s": manifest["duration_s"], "written": written}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=35887)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench_runs" / "image_ingest"))
    args, beam_args = parser.parse_known_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    csv_path, tree = write_inputs(args.rows, work)
    print(f"inputs ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    runs: dict[str, list[dict]] = {"csv": [], "images": []}
    for _ in range(args.repeats):   # alternating, so load drifts hit both alike
        runs["csv"].append(ingest_once(csv_path, work / "run_csv", beam_args))
        runs["images"].append(ingest_once(tree, work / "run_images", beam_args))
    median = {kind: {key: statistics.median(r[key] for r in found)
                     for key in ("wall_s", "step_s")} for kind, found in runs.items()}
    ratio = median["images"]["step_s"] / median["csv"]["step_s"]
    results = {"rows": args.rows, "cpu": cpu_description(), "beam_args": beam_args,
               "runs": runs, "median": median, "ratio_step": ratio,
               "written": {kind: found[0]["written"] for kind, found in runs.items()}}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{args.rows:,} faces, {cpu_description()}, beam flags {beam_args or 'none'}, "
          f"median of {args.repeats}")
    print("| input | examples written | ingest step s | process wall s |")
    print("|---|---|---|---|")
    for kind, label in (("csv", "CSV"), ("images", "PNG tree (Kaggle layout)")):
        print(f"| {label} | {results['written'][kind]:,} | {median[kind]['step_s']:.1f} | "
              f"{median[kind]['wall_s']:.1f} |")
    print(f"\nimage tree / CSV (step time): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
