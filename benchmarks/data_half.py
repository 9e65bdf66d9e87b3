"""Benchmark of the data half: CSV -> examples -> statistics -> validation -> augmented -> transform.

Runs each step as its own `fer-pipeline <step>` process (as an orchestrator would) on a
synthetic FER-2013 CSV of 35,887 rows (FER-2013's size) and on twice that, and records per
stage: wall time, the step's own duration from its manifest, rows/s and the process's peak
RSS. In the same run it measures the seed notebook's way of preparing the data (pandas
read_csv, a per-row split into a float array, /255) as the baseline.

    .venv/bin/python benchmarks/data_half.py [--rows 35887] [--repeats 1] [--out DIR]

Prints a markdown table (pasted into docs/benchmarks.md) and writes results.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ["ingest", "statistics", "validate", "augment", "transform"]
STEP_DIRS = {"ingest": "examples", "statistics": "statistics", "validate": "anomalies",
             "augment": "augmented", "transform": "transform"}

NOTEBOOK_BASELINE = """
import sys, time, numpy as np, pandas as pd
start = time.perf_counter()
df = pd.read_csv(sys.argv[1])
images = np.array([np.array(p.split(), dtype='float32') for p in df['pixels']]) / 255.0
images = images.reshape(-1, 48, 48, 1)
labels = df['emotion'].values
print(time.perf_counter() - start)
"""


def measure_peak_in_fresh_interpreter(command: list[str]) -> tuple[float, float, str]:
    """RUSAGE_CHILDREN is a running maximum, so each measurement runs under a fresh parent."""
    wrapper = ("import json,sys,subprocess,time,resource;"
               "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "w=time.perf_counter()-t;"
               "print(json.dumps({'rc':p.returncode,'wall':w,"
               "'peak':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
               "'out':p.stdout[-2000:],'err':p.stderr[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                         text=True, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    if record["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{record['err']}")
    return record["wall"], record["peak"], record["out"]


def bench_size(rows: int, work: Path, beam_args: list[str]) -> dict:
    csv_path = work / f"fer_{rows}.csv"
    if not csv_path.exists():
        subprocess.run([str(BIN / "fer-pipeline"), "synth", "--rows", str(rows),
                        "--out", str(csv_path)], check=True)
    run_root = work / f"run_{rows}"
    shutil.rmtree(run_root, ignore_errors=True)
    result = {"rows": rows, "csv_mib": csv_path.stat().st_size / 2**20, "stages": {}}
    for stage in STAGES:
        command = [str(BIN / "fer-pipeline"), stage, "--output", str(run_root), *beam_args]
        if stage == "ingest":
            command += ["--data", str(csv_path)]
        wall, peak, _ = measure_peak_in_fresh_interpreter(command)
        manifest = json.loads((run_root / STEP_DIRS[stage] / "manifest.json").read_text())
        step_s = manifest["duration_s"]
        result["stages"][stage] = {"wall_s": wall, "step_s": step_s,
                                   "rows_per_s": rows / step_s, "peak_rss_mib": peak}
    result["total_wall_s"] = sum(s["wall_s"] for s in result["stages"].values())
    result["total_step_s"] = sum(s["step_s"] for s in result["stages"].values())

    wall, peak, out = measure_peak_in_fresh_interpreter(
        [sys.executable, "-c", NOTEBOOK_BASELINE, str(csv_path)])
    result["notebook_baseline"] = {"wall_s": wall, "work_s": float(out.strip()),
                                   "rows_per_s": rows / float(out.strip()),
                                   "peak_rss_mib": peak}
    return result


def to_markdown(results: list[dict]) -> str:
    lines = ["| rows | stage | step s | rows/s | process wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for stage, s in r["stages"].items():
            lines.append(f"| {r['rows']:,} | {stage} | {s['step_s']:.1f} | "
                         f"{s['rows_per_s']:,.0f} | {s['wall_s']:.1f} | {s['peak_rss_mib']:,.0f} |")
        lines.append(f"| {r['rows']:,} | **data half total** | {r['total_step_s']:.1f} | "
                     f"{r['rows'] / r['total_step_s']:,.0f} | {r['total_wall_s']:.1f} | |")
        b = r["notebook_baseline"]
        lines.append(f"| {r['rows']:,} | notebook baseline (pandas, split, /255) | "
                     f"{b['work_s']:.1f} | {b['rows_per_s']:,.0f} | {b['wall_s']:.1f} | "
                     f"{b['peak_rss_mib']:,.0f} |")
    if len(results) == 2:
        ratio = results[1]["total_wall_s"] / results[0]["total_wall_s"]
        lines.append(f"\nScaling: {results[1]['rows']:,} rows took {ratio:.2f}x the wall time "
                     f"of {results[0]['rows']:,} rows.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=35887)
    parser.add_argument("--no-double", action="store_true", help="skip the 2x size")
    parser.add_argument("--out", default=str(ROOT / "bench_runs" / "data_half"))
    args, beam_args = parser.parse_known_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [args.rows] if args.no_double else [args.rows, 2 * args.rows]
    results = [bench_size(rows, work, beam_args) for rows in sizes]
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "beam_args": beam_args, "results": results}
    (work / "results.json").write_text(json.dumps(report, indent=2))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
