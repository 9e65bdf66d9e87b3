"""One small full pipeline run, built once per test session and shared by every test that
only reads a finished run (the end-to-end tests, infra validation, bulk inference,
monitoring).

The run is the smoke profile on a synthetic CSV made dirty on purpose: bad rows ExampleGen
must quarantine (with the reason it gives) and one training face copied into PrivateTest
(a cross-split leak it must catch). Under pytest-xdist every worker gets the same run: the
first worker to ask builds it under a file lock in the session's shared temp directory, the
others wait and then read it. Tests must not change it: copy what you change into tmp_path.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.core.artifacts import read_commit
from fer_pipeline.core.config import PipelineConfig, load_config
from fer_pipeline.pipeline.dag import build_steps
from fer_pipeline.pipeline.runner import RunContext, StepOutcome, run_pipeline

SMOKE_ROWS = 2400
# (description, raw line) for rows ExampleGen must quarantine, with the reason it gives.
BAD_ROWS = [
    ("label out of range", '9,"{}",Training'),
    ("wrong pixel count", '3,"1 2 3",Training'),
    ("pixel out of range", '3,"{}",PublicTest'),
    ("non-integer pixel", '2,"{}",Training'),
    ("missing field", '4'),
]
_DONE = "smoke_run.json"


@dataclass
class SmokeRun:
    ctx: RunContext
    outcomes: list[StepOutcome]      # every step, in order, as the first run committed it
    work: Path                       # directory holding the CSVs and the run root
    data: str                        # the dirty CSV the run ingested
    rows: int                        # data rows in it (header excluded)
    bad_lines: dict[int, str] = field(default_factory=dict)  # 1-based line -> bad-row kind
    leaked_line: int = 0             # 1-based line of the training face copied into test

    @property
    def run_root(self) -> str:
        return self.ctx.run_root

    @property
    def config(self) -> PipelineConfig:
        return self.ctx.config


def smoke_config() -> PipelineConfig:
    """The smoke profile exactly as `make demo` runs it: the tests assert that the CNN
    learns; the VGG16 only has to be trained, evaluated and judged by the gate."""
    return load_config(profile="smoke")


def build_or_reuse_smoke_run(shared_dir: Path) -> SmokeRun:
    """The session's smoke run under `shared_dir`: built by whoever gets the lock first."""
    work = shared_dir / "smoke_run"
    with _exclusive(shared_dir / "smoke_run.lock"):
        done = work / _DONE
        if not done.exists():
            work.mkdir(parents=True, exist_ok=True)
            facts = _build(work)
            done.write_text(json.dumps(facts))
        facts = json.loads(done.read_text())
    ctx = RunContext(data_paths=[facts["data"]], run_root=str(work / "run"),
                     config=smoke_config())
    return SmokeRun(ctx=ctx, outcomes=_committed_outcomes(ctx, facts["skipped"]), work=work,
                    data=facts["data"], rows=facts["rows"],
                    bad_lines={int(k): v for k, v in facts["bad_lines"].items()},
                    leaked_line=facts["leaked_line"])


def _build(work: Path) -> dict:
    clean = str(work / "clean.csv")
    generate_csv(clean, rows=SMOKE_ROWS, seed=11)
    data = str(work / "fer_dirty.csv")
    facts = write_dirty_csv(clean, data)
    ctx = RunContext(data_paths=[data], run_root=str(work / "run"), config=smoke_config())
    outcomes = run_pipeline(ctx)
    return {"data": data, "skipped": {o.step: o.skipped for o in outcomes}, **facts}


def _committed_outcomes(ctx: RunContext, skipped: dict[str, bool]) -> list[StepOutcome]:
    """The outcome of each step as committed, the same in every worker."""
    outcomes = []
    for step in build_steps(ctx.models):
        if step.name not in skipped:   # a step the run left off (tune, unless asked)
            continue
        commit = read_commit(os.path.join(ctx.run_root, step.directory))
        assert commit is not None, f"the smoke run has no commit for {step.name}"
        outcomes.append(StepOutcome(step.name, commit.uri, skipped[step.name],
                                    commit.manifest, commit))
    return outcomes


def write_dirty_csv(clean_path: str, dirty_path: str) -> dict:
    """Appends bad rows and copies one training image into PrivateTest (a leak to catch)."""
    with open(clean_path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    train_row = next(r for r in body if r[2] == "Training")
    leaked = [train_row[0], train_row[1], "PrivateTest"]
    lines = [",".join(header)] + [f'{r[0]},"{r[1]}",{r[2]}' for r in body]
    lines.append(f'{leaked[0]},"{leaked[1]}",{leaked[2]}')
    leaked_line = len(lines)  # 1-based line number of the leaked copy
    bad_lines = {}
    for kind, template in BAD_ROWS:
        lines.append(template.format(_bad_pixels(kind)) if "{}" in template else template)
        bad_lines[len(lines)] = kind
    Path(dirty_path).write_text("\r\n".join(lines) + "\r\n")
    return {"rows": len(lines) - 1, "bad_lines": bad_lines, "leaked_line": leaked_line}


def _bad_pixels(kind: str) -> str:
    values = ["128"] * 2304
    if kind == "pixel out of range":
        values[100] = "256"
    if kind == "non-integer pixel":
        values[5] = "1.5"
    return " ".join(values)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (pytest-xdist workers are processes)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def session_shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this session sees (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
