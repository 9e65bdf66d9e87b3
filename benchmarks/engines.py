"""Benchmark: the data half on each engine, in one run.

Runs `fer-pipeline run --steps ingest,augment,statistics,validate,transform` on one
synthetic FER-2013 CSV (35,887 rows by default) four ways, one after the other:

  direct       Beam's DirectRunner in-process (the default)
  direct-mp2   DirectRunner, --direct_running_mode=multi_processing --direct_num_workers=2
  flink        a local Flink 1.19 cluster, --parallelism=2 (tools/local_cluster.py)
  spark        a local Spark 3.2.2 standalone cluster, 2 worker cores

For each: wall time of the whole command, each step's own duration (its manifest), and
the peak resident memory of every process involved: the fer-pipeline client, its
DirectRunner workers, and for the clusters every daemon (JobManager, TaskManager, Master,
Worker, executor, job server, worker pool) and every Python SDK worker the pool started.
Peaks are sampled from /proc every 0.2 s (daemons: VmHWM, their peak since start, which
includes starting the cluster). A cluster is started before its run and stopped after,
outside the timed command.

    .venv/bin/python benchmarks/engines.py [--rows 35887] [--only flink,spark] [--out DIR]

Prints a markdown table for docs/benchmarks.md and writes results.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402
from tools import local_cluster  # noqa: E402

BIN = Path(sys.executable).parent
DATA_STEPS = ["ingest", "augment", "statistics", "validate", "transform"]
STEP_DIRS = {"ingest": "examples", "augment": "augmented", "statistics": "statistics",
             "validate": "anomalies", "transform": "transform"}
MODES = {
    "direct": [],
    "direct-mp2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "flink": None,     # flags come from the cluster
    "spark": None,
}


class PeakSampler:
    """Peak RSS (MiB) per process of the watched process trees, by role."""

    def __init__(self, roots: dict[str, int]):
        self.roots = dict(roots)        # role -> pid whose descendants are watched too
        self.peaks: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        parents = _process_table()
        for pid, (ppid, name) in parents.items():
            role = self._role_of(pid, parents)
            if role is None:
                continue
            rss = _rss_mib(pid)
            label = role if pid in self.roots.values() else f"{role} > {name}"
            if rss and rss > self.peaks.get(pid, ("", 0.0))[1]:
                self.peaks[pid] = (label, rss)

    def _role_of(self, pid: int, parents: dict[int, tuple[int, str]]):
        seen = 0
        while pid > 1 and seen < 64:
            for role, root in self.roots.items():
                if pid == root:
                    return role
            pid = parents.get(pid, (0, ""))[0]
            seen += 1
        return None

    def by_label(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for label, rss in self.peaks.values():
            entry = out.setdefault(label, {"processes": 0, "peak_mib": 0.0})
            entry["processes"] += 1
            entry["peak_mib"] = max(entry["peak_mib"], round(rss, 1))
        return out


def _process_table() -> dict[int, tuple[int, str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            table[int(entry)] = (ppid, _short_command(int(entry), name))
        except (OSError, ValueError):
            continue
    return table


def _short_command(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return name
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "sdk_worker" in text or "SdkHarness" in text:
        return "python SDK worker"
    if "CoarseGrainedExecutorBackend" in text:
        return "Spark executor (JVM)"
    if "tools.worker_pool" in text or "worker_pool_main" in text:
        return "worker pool"
    if name.startswith("python"):
        return "python (other child process)"
    return name


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0.0
    value = fields.get("VmHWM") or fields.get("VmRSS") or "0 kB"
    return int(value.split()[0]) / 1024


def run_mode(mode: str, csv_path: Path, work: Path) -> dict:
    cluster = None
    if MODES[mode] is None:
        started = time.perf_counter()
        cluster = local_cluster.start(mode, work / f"{mode}_cluster")
        startup = time.perf_counter() - started
        flags = cluster.beam_args(parallelism=2)
    else:
        startup, flags = 0.0, MODES[mode]
    run_root = work / f"run_{mode}"
    command = [str(BIN / "fer-pipeline"), "run", "--data", str(csv_path), "--output",
               str(run_root), "--steps", ",".join(DATA_STEPS), *flags]
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        roots = {"fer-pipeline client": process.pid, **(cluster.pids if cluster else {})}
        with PeakSampler(roots) as sampler:
            out, err = process.communicate()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(f"{mode} failed ({process.returncode}):\n{err[-3000:]}")
    finally:
        if cluster is not None:
            local_cluster.stop(cluster)
    return {"mode": mode, "wall_s": round(wall, 1), "cluster_start_s": round(startup, 1),
            "steps_s": _step_durations(run_root), "memory": sampler.by_label(),
            "flags": flags}


def _step_durations(run_root: Path) -> dict[str, float]:
    durations = {}
    for step, directory in STEP_DIRS.items():
        commit = json.loads((run_root / directory / "COMMIT.json").read_text())
        manifest = json.loads((run_root / directory / commit["execution"] / "manifest.json")
                              .read_text())
        durations[step] = manifest["duration_s"]
    return durations


def markdown(results: list[dict], rows: int) -> str:
    lines = [f"{rows:,} rows, {cpu_description()}", "",
             "| engine | wall s | cluster start s | "
             + " | ".join(f"{s} s" for s in DATA_STEPS) + " | peak RSS per process (MiB) |",
             "|---" * (4 + len(DATA_STEPS)) + "|"]
    for r in results:
        memory = "; ".join(f"{label} {m['peak_mib']:.0f}"
                           + (f" (x{m['processes']})" if m["processes"] > 1 else "")
                           for label, m in sorted(r["memory"].items()))
        lines.append(f"| {r['mode']} | {r['wall_s']} | {r['cluster_start_s'] or '-'} | "
                     + " | ".join(str(round(r["steps_s"][s], 1)) for s in DATA_STEPS)
                     + f" | {memory} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=35887)
    parser.add_argument("--only", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", default=str(ROOT / "bench_runs" / "engines"))
    args = parser.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"fer_{args.rows}.csv"
    if not csv_path.exists():
        subprocess.run([str(BIN / "fer-pipeline"), "synth", "--rows", str(args.rows),
                        "--out", str(csv_path)], check=True, capture_output=True)
    results = []
    for mode in args.only.split(","):
        print(f"[bench] {mode} ...", flush=True)
        results.append(run_mode(mode, csv_path, work))
        print(f"[bench] {mode}: {results[-1]['wall_s']} s", flush=True)
        (work / "results.json").write_text(json.dumps(
            {"rows": args.rows, "cpu": cpu_description(), "results": results}, indent=2))
    print(markdown(results, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
