"""fer_pipeline.core.errors.exit_process: a console script's fast exit loses nothing a normal exit keeps.

Each case runs in a child process, since exit_process ends the process that calls it.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_child(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_status_buffered_output_and_atexit_handlers_survive(tmp_path):
    result = _run_child("""
        import atexit, logging, sys
        from pathlib import Path
        from fer_pipeline.core.errors import exit_process
        out = Path(sys.argv[1])
        atexit.register(lambda: (out / "atexit-ran").write_text("yes"))
        # A handler that buffers until logging.shutdown() flushes it (an atexit handler).
        stream = open(out / "log.txt", "w", buffering=1 << 20)
        logging.getLogger("child").addHandler(logging.StreamHandler(stream))
        logging.getLogger("child").warning("logged before exit")
        print("printed to a pipe, still in the buffer", end="")
        print("and on stderr", end="", file=sys.stderr)
        exit_process(3)
        print("never reached")
        """, tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "printed to a pipe, still in the buffer"
    assert result.stderr == "and on stderr"
    assert (tmp_path / "atexit-ran").read_text() == "yes"
    assert (tmp_path / "log.txt").read_text() == "logged before exit\n"


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    result = _run_child("""
        import sys, threading, time
        from pathlib import Path
        from fer_pipeline.core.errors import exit_process
        out = Path(sys.argv[1])
        def finish_late():
            time.sleep(0.5)
            (out / "thread-finished").write_text("yes")
        threading.Thread(target=finish_late).start()
        exit_process(0)
        """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "thread-finished").read_text() == "yes"


@pytest.mark.parametrize("script", ["fer-pipeline", "fer-serve", "fer-client", "fer-review"])
def test_every_console_script_leaves_through_it(script, monkeypatch):
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][script]
    module = importlib.import_module(target.split(":")[0])
    exits = []
    monkeypatch.setattr(module, "main", lambda argv=None: 7)
    monkeypatch.setattr(module, "exit_process", exits.append)
    getattr(module, target.split(":")[1])()
    assert exits == [7]
