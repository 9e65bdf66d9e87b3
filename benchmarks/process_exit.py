"""How long a process that ran TensorFlow takes to end: sys.exit against exit_process.

Every console script ends through fer_pipeline.core.errors.exit_process, which runs the atexit
handlers, flushes stdout and stderr, and leaves through os._exit instead of letting the
interpreter tear down its modules and TensorFlow's C++ state. This measures what that
saves per process on the machine it runs on.

The child does what a fer-pipeline command does before it ends: imports the pipeline's
modules (TensorFlow, Beam, TFT, TFDV), builds the CNN and runs it once, then ends one way
or the other. The parent times, for each child, the whole run (start to reaped) and the
exit alone (from the child's last line to reaped), paired A B A B so drift on a shared
machine falls on both.

    .venv/bin/python benchmarks/process_exit.py [--pairs 5]

Prints a markdown table (medians over the pairs, and the ratio) with the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_description  # noqa: E402

WAYS = ("sys.exit", "exit_process")
CHILD = """
import sys, time
import numpy as np
from fer_pipeline.core import quiet
quiet.install()
import fer_pipeline.pipeline.cli, fer_pipeline.pipeline.runner  # noqa
import fer_pipeline.components.transform, fer_pipeline.components.statistics.executor  # noqa
from fer_pipeline.components.trainer.models import build_cnn
from fer_pipeline.core.config import MODEL_REGISTRY
from fer_pipeline.core.errors import exit_process
model = build_cnn(MODEL_REGISTRY["cnn"].defaults)
model.predict(np.zeros((8, 2304), "float32"), verbose=0)
print("main returned", flush=True)
if sys.argv[1] == "sys.exit":
    sys.exit(0)
exit_process(0)
"""


def time_child(way: str) -> dict[str, float]:
    """Seconds for the whole child and for its exit alone (after its last line)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, way], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = child.stdout.readline()
    returned = time.perf_counter()
    child.stdout.read()
    if child.wait() != 0 or line.strip() != "main returned":
        raise SystemExit(f"the {way} child failed (exit status {child.returncode})")
    ended = time.perf_counter()
    return {"whole run": ended - start, "exit": ended - returned}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    runs = {way: [] for way in WAYS}
    time_child(WAYS[1])  # warm-up: the page cache holds the libraries from here on
    for _ in range(args.pairs):
        for way in WAYS:
            runs[way].append(time_child(way))
    print(f"{cpu_description()}; {args.pairs} pairs, medians in seconds\n")
    print(f"| | {' | '.join(WAYS)} | ratio |")
    print("|---|---|---|---|")
    for figure in ("whole run", "exit"):
        medians = [statistics.median(run[figure] for run in runs[way]) for way in WAYS]
        print(f"| {figure} | {medians[0]:.2f} | {medians[1]:.2f} | "
              f"{medians[1] / medians[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
