"""A distributed search: a chief and N workers, each a process of its own (worker.py).

KerasTuner's distributed mode: every process builds the same tuner; the one whose
KERASTUNER_TUNER_ID is "chief" serves the oracle over gRPC on KERASTUNER_ORACLE_IP:PORT,
the others ("tuner0", "tuner1"...) ask it for trials, train them and report back. Here
they all run on this machine, the oracle on a free loopback port; on a cluster the same
environment variables point workers on other machines at the chief.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from fer_pipeline.components.tuner.search import SearchSettings, settings_json
from fer_pipeline.core.net import LOOPBACK, free_port

__all__ = ["LOGS_DIR", "run_distributed"]

LOGS_DIR = "logs"      # <output>/logs/<tuner id>.log: each process's own output


def run_distributed(settings: SearchSettings, workers: int,
                    timeout_s: Optional[float] = None) -> dict[str, str]:
    """Runs the search on a chief and `workers` worker processes; returns each process's
    log file by tuner id. RuntimeError naming the log of a process that failed."""
    logs_dir = os.path.join(settings.output_dir, LOGS_DIR)
    os.makedirs(logs_dir, exist_ok=True)
    env = {**os.environ, "KERASTUNER_ORACLE_IP": LOOPBACK,
           "KERASTUNER_ORACLE_PORT": str(free_port()),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    argument = json.dumps(settings_json(settings))
    ids = ["chief"] + [f"tuner{i}" for i in range(workers)]
    processes, logs = {}, {}
    try:
        for tuner_id in ids:   # the chief first: workers wait for its oracle to answer
            logs[tuner_id] = os.path.join(logs_dir, f"{tuner_id}.log")
            with open(logs[tuner_id], "w") as log:
                processes[tuner_id] = subprocess.Popen(
                    [sys.executable, "-m", "fer_pipeline.components.tuner.worker", argument],
                    env={**env, "KERASTUNER_TUNER_ID": tuner_id}, stdout=log,
                    stderr=subprocess.STDOUT)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Workers end when the oracle has no trial left; the chief once they all have.
        for tuner_id in ids[1:] + ids[:1]:
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            code = processes[tuner_id].wait(timeout=left)
            if code != 0:
                raise RuntimeError(f"tuning process {tuner_id} exited with code {code}; "
                                   f"its output: {logs[tuner_id]}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return logs
