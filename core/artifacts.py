"""How a step's output is written, committed and found, on a local disk or an object store.

A step's outputs live under `<run_root>/<step directory>/<execution id>/`. The step writes
there (a fresh prefix nobody reads yet: the staging area), then writes `manifest.json`
inside it, and finally commits by writing one small record, `<step directory>/COMMIT.json`,
naming that execution directory and the fingerprint of each output. Readers trust only
what a commit record names: a step that crashes leaves an execution directory that no
record names, and the previous committed output stays what everyone reads. Nothing is
renamed, so this works where directories do not exist (gs://, s3://): the record is one
object, and an object becomes visible only once its upload is complete.

Fingerprints are sha256 over relative paths and bytes, so a step downstream can tell
whether its inputs changed without trusting timestamps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from fer_pipeline.core import fileio
from fer_pipeline.core.fileio import to_jsonable  # noqa: F401  (callers import it from here too)
from fer_pipeline.core.contract import MANIFEST_FILE

COMMIT_FILE = "COMMIT.json"
# Execution directories are named EXECUTION_PREFIX + a prefix of the step's cache key.
EXECUTION_PREFIX = "x-"


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a directory's relative paths and file bytes.

    A directory's own top-level manifest is left out (it holds a duration that changes
    every run); nested files are not special.
    """
    path = str(path)
    digest = hashlib.sha256()
    if not fileio.exists(path):
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    if fileio.isdir(path):
        files = [(rel, full) for rel, full in fileio.walk_files(path) if rel != MANIFEST_FILE]
    else:
        files = [(os.path.basename(path.rstrip("/")), path)]
    for name, file_path in files:
        digest.update(name.encode() + b"\0")
        # In chunks (memory stays bounded on multi-GB shards); one GET per s3:// object.
        for chunk in fileio.iter_chunks(file_path):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON so a reader never sees half of it.

    Locally: a temp file renamed over the target (a file rename, which every POSIX disk
    has). On object stores an object appears only once its upload completes, so a plain
    write has the same effect.
    """
    path = str(path)
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n"
    if fileio.is_uri(path):
        fileio.write_text(path, text)
        return
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    Path(tmp).write_text(text)
    os.replace(tmp, path)


@dataclasses.dataclass
class Commit:
    """What a commit record says: the committed execution and its outputs."""
    step: str
    execution: str                        # the execution directory's name
    uri: str                              # the execution directory
    cache_key: str
    outputs: dict[str, dict[str, str]]    # output name -> {"uri", "fingerprint"}
    manifest: dict[str, Any]

    def output_uri(self, name: str) -> str:
        if name not in self.outputs:
            raise KeyError(f"step {self.step!r} has no output {name!r}; "
                           f"it has {sorted(self.outputs)}")
        return self.outputs[name]["uri"]


def read_commit(step_root: str) -> Optional[Commit]:
    """The committed output of the step whose directory is `step_root`, or None."""
    path = fileio.join(step_root, COMMIT_FILE)
    if not fileio.exists(path):
        return None
    record = fileio.read_json(path)
    found = Commit(**{f.name: record[f.name] for f in dataclasses.fields(Commit)})
    return _rebased(found, step_root) if _is_relative(found.uri) else found


def _is_relative(uri: str) -> bool:
    return not fileio.is_uri(uri) and not os.path.isabs(uri)


def _rebased(record: Commit, step_root: str) -> Commit:
    """A record written before run roots were made absolute names its outputs relative to
    the directory the run was started from; the record's own place says where they are."""
    old_root = record.uri.rstrip("/").rstrip(os.sep)
    new_root = fileio.join(fileio.absolute(step_root), record.execution)

    def moved(uri: str) -> str:
        return new_root + uri[len(old_root):] if uri.startswith(old_root) else uri

    outputs = {name: {**out, "uri": moved(out["uri"])} for name, out in record.outputs.items()}
    return dataclasses.replace(record, uri=new_root, outputs=outputs)


def commit(step_root: str, record: Commit) -> None:
    """Publishes `record.uri` as the step's output: the record is written last."""
    write_json_atomic(fileio.join(step_root, COMMIT_FILE), record)


def remove_uncommitted(step_root: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Deletes execution directories no commit record names (except `keep`)."""
    if not fileio.isdir(step_root):
        return []
    current = read_commit(step_root)
    keep = set(keep) | ({current.execution} if current else set())
    removed = []
    for name in fileio.listdir(step_root):
        full = fileio.join(step_root, name)
        if name == COMMIT_FILE or name.startswith(".") or name in keep:
            continue
        if name.startswith(EXECUTION_PREFIX):
            fileio.rmtree(full)
            removed.append(name)
    return removed


def relative_paths(value: Any, root: str) -> Any:
    """Paths inside an execution directory are recorded relative to it."""
    if isinstance(value, str) and value.startswith(root):
        return value[len(root):].lstrip("/").lstrip(os.sep) or "."
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, root) for v in value]
    return value
