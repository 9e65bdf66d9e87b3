"""Servers the tests start as child processes (MariaDB, the S3 server): waiting until one
answers, and stopping it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable


def wait_until_ready(name: str, process: subprocess.Popen, log_path: Path,
                     ready: Callable[[], bool], timeout_s: float, poll_s: float) -> None:
    """Polls `ready` until it says yes; raises RuntimeError, with the server's log, if the
    process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; "
                               f"log: {log_path.read_text(errors='replace')[-2000:]}")
        if ready():
            return
        time.sleep(poll_s)
    raise RuntimeError(f"{name} was not ready in {timeout_s}s; log: {log_path}")


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM (the servers' clean shutdown), then SIGKILL after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
