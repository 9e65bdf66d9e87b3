"""The artifact contract between steps: one directory per step, each with a manifest.json.

A step's manifest records what it read (with content fingerprints), its parameters, its
counts, its outputs and how long it took. `run_step` skips a step whose manifest shows the
same input fingerprints and parameters, and otherwise builds the step in a hidden sibling
directory that is renamed into place only when the step succeeded, so a crashed step never
leaves a directory that looks finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a directory's relative paths and file bytes.

    A step directory's own manifest is left out (it holds a duration that changes every
    run), but the manifests of nested inputs are not special.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*")
                       if p.is_file() and p.relative_to(path) != Path(MANIFEST))
    else:
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    for name, file_path in files:
        digest.update(name.encode() + b"\0")
        with open(file_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def read_manifest(step_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    path = Path(step_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class StepOutcome:
    step: str
    step_dir: str
    skipped: bool
    manifest: dict[str, Any]


def run_step(step: str, step_dir: str | os.PathLike, inputs: Mapping[str, str],
             parameters: Any, body: Callable[[str], Any], force: bool = False,
             resumable: bool = False) -> StepOutcome:
    """Runs `body(work_dir)` unless `step_dir` already holds a matching finished run.

    `inputs` maps input names to paths (fingerprinted); `parameters` is any JSON-able value
    or dataclass. `body` writes its outputs under the directory it is given and returns a
    result record (dataclass or dict) that goes into the manifest. Output paths in the
    record are written relative to the step directory. A `resumable` step (training) keeps
    the work directory a killed earlier attempt left behind, so it can pick up its
    checkpoints; other steps start from an empty one.
    """
    step_dir = Path(step_dir)
    input_prints = {name: {"path": str(p), "fingerprint": fingerprint(p)}
                    for name, p in sorted(inputs.items())}
    params = to_jsonable(parameters)
    previous = read_manifest(step_dir)
    if (not force and previous is not None and previous.get("inputs") == input_prints
            and previous.get("parameters") == params):
        log.info("step %s: inputs and parameters unchanged, skipping (%s)", step, step_dir)
        return StepOutcome(step, str(step_dir), True, previous)

    work_dir = step_dir.with_name(f".{step_dir.name}.partial")
    if work_dir.exists() and not (resumable and not force):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = to_jsonable(body(str(work_dir)))
    result = _relative_paths(result, str(work_dir))
    manifest = {
        "step": step,
        "inputs": input_prints,
        "parameters": params,
        "result": result,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
    }
    write_json_atomic(work_dir / MANIFEST, manifest)
    # Swap in the finished directory; the old one is removed only after the new one is ready.
    old_dir = step_dir.with_name(f".{step_dir.name}.old")
    if old_dir.exists():
        shutil.rmtree(old_dir)
    if step_dir.exists():
        os.replace(step_dir, old_dir)
    os.replace(work_dir, step_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)
    return StepOutcome(step, str(step_dir), False, manifest)


def _relative_paths(value: Any, root: str) -> Any:
    """Paths inside the temporary work dir are rewritten relative to the step directory."""
    if isinstance(value, str) and value.startswith(root):
        return os.path.relpath(value, root)
    if isinstance(value, dict):
        return {k: _relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v, root) for v in value]
    return value
