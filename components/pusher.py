"""Pusher: publishes blessed models into the directory TF Serving polls.

Layout (TF Serving's): `<serving_root>/<model>/<integer version>/saved_model.pb + variables/`
and `<serving_root>/models.config`. TF Serving polls the model directories and loads any new
integer version it sees, so a version must appear complete or not at all. Every version is
therefore copied into a hidden sibling (`.tmp-<version>-<random>`; TF Serving ignores names
that are not integers), flushed to disk, and renamed into place in one `os.rename`. A push
that crashes leaves only a hidden temp directory, which the next push removes.

Only models the evaluator blessed (`<evaluation_dir>/blessings.json`) are pushed; refusals
carry the evaluator's reasons. This module does not import TensorFlow: it moves files.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from pipeline.artifacts import write_json_atomic
from pipeline.config import PushConfig
from pipeline.contract import (MODELS_CONFIG, DOCKER_MODELS_CONFIG, SERVING_MODEL_DIR,
    BLESSINGS_FILE, PUSH_FILE)
from serving.model_config import (ModelSpec, container_config, docker_command,
                                  write_model_server_config)

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"                  # in-flight copies
DELETE_PREFIX = ".deleting-"           # old versions being removed


@dataclass
class ModelPush:
    pushed: bool
    version: Optional[int] = None      # the new version, when pushed
    path: Optional[str] = None         # serving_root/<name>/<version>, when pushed
    reasons: list[str] = field(default_factory=list)   # the evaluator's verdict either way
    removed_versions: list[int] = field(default_factory=list)  # pruned by keep_versions


@dataclass
class PushResult:
    serving_root: str
    models_config: str
    models: dict[str, ModelPush]
    push_json: str
    docker_models_config: str = ""
    tfserving_command: str = ""         # serves serving_root with the real TF Serving


# ----------------------------------------------------------------------------- layout helpers

def served_versions(serving_root: str, name: str) -> list[int]:
    """The integer versions of `name` under `serving_root`, ascending ([] when none).

    Hidden temp directories and anything whose name is not a plain integer are ignored,
    exactly as TF Serving ignores them.
    """
    model_root = Path(serving_root) / name
    if not model_root.is_dir():
        return []
    return sorted(int(p.name) for p in model_root.iterdir()
                  if p.is_dir() and p.name.isdigit())


def latest_served_version(serving_root: str, name: str) -> Optional[tuple[int, str]]:
    """(version, path) of the highest version of `name` in serving, or None."""
    versions = served_versions(serving_root, name)
    if not versions:
        return None
    return versions[-1], str(Path(serving_root) / name / str(versions[-1]))


def _served_model_names(serving_root: str) -> list[str]:
    root = Path(serving_root)
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and served_versions(root, p.name))


# ----------------------------------------------------------------------------- durable copy

def _fsync_path(path: str) -> None:
    """Flushes a file's or directory's metadata to disk (a rename is only durable then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: str, dst: str) -> str:
    """Copies one file and fsyncs it. Tests replace this to inject a crash mid-copy."""
    shutil.copy2(src, dst)
    _fsync_path(dst)
    return dst


def _fsync_tree(root: str) -> None:
    # Files were fsynced as they were copied; directory entries need their own fsync.
    for dirpath, _, _ in os.walk(root):
        _fsync_path(dirpath)


def _remove_stale_temps(model_root: Path) -> list[str]:
    """Removes hidden leftovers of a crashed earlier push or prune; returns their names."""
    removed = []
    for entry in model_root.iterdir():
        if entry.name.startswith((TEMP_PREFIX, DELETE_PREFIX)):
            log.warning("removing leftover %s from an interrupted push", entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _publish_version(source: Path, model_root: Path, version: int) -> Path:
    """Copies `source` to `model_root/<version>` so that it appears complete or not at all."""
    target = model_root / str(version)
    temp = model_root / f"{TEMP_PREFIX}{version}-{secrets.token_hex(4)}"
    try:
        shutil.copytree(source, temp, copy_function=_copy_file)
        _fsync_tree(str(temp))
        os.rename(temp, target)   # fails rather than merging if `target` appeared meanwhile
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # best effort; the next push cleans up anyway
        raise
    _fsync_path(str(model_root))
    return target


def _prune_versions(model_root: Path, keep: int) -> list[int]:
    """Deletes all but the newest `keep` versions; returns the removed version numbers."""
    versions = served_versions(str(model_root.parent), model_root.name)
    doomed = versions[:-keep] if keep < len(versions) else []
    for version in doomed:
        # Rename first so a half-deleted version is never visible under an integer name.
        hidden = model_root / f"{DELETE_PREFIX}{version}-{secrets.token_hex(4)}"
        os.rename(model_root / str(version), hidden)
        shutil.rmtree(hidden)
    return doomed


# ----------------------------------------------------------------------------- entry point

def _read_blessings(evaluation_dir: str) -> dict[str, dict]:
    path = Path(evaluation_dir) / BLESSINGS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the evaluator before the pusher")
    return json.loads(path.read_text())


def _push_one(name: str, model_dir: str, serving_root: Path, keep: int) -> ModelPush:
    source = Path(model_dir) / SERVING_MODEL_DIR
    if not (source / "saved_model.pb").exists():
        raise FileNotFoundError(f"model {name!r}: no SavedModel at {source}")
    model_root = serving_root / name
    model_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(model_root)
    existing = served_versions(str(serving_root), name)
    version = existing[-1] + 1 if existing else 1
    target = _publish_version(source, model_root, version)
    removed = _prune_versions(model_root, keep)
    log.info("pushed %s as version %d (%s); removed old versions %s", name, version, target,
             removed)
    return ModelPush(pushed=True, version=version, path=str(target), removed_versions=removed)


def _push_if_blessed(name: str, model_dir: str, verdict: Optional[dict], evaluation_dir: str,
                     root: Path, keep: int) -> ModelPush:
    if verdict is None:
        return ModelPush(pushed=False, reasons=[
            f"no blessing recorded for {name!r} in {evaluation_dir}/blessings.json"])
    reasons = list(verdict.get("reasons", []))
    if not verdict.get("blessed", False):
        log.warning("not pushing %s: %s", name, "; ".join(reasons))
        return ModelPush(pushed=False, reasons=["not blessed"] + reasons)
    outcome = _push_one(name, model_dir, root, keep)
    outcome.reasons = reasons
    return outcome


def write_serving_config(serving_root: str) -> str:
    """Writes serving_root/models.config for every model present there (latest version),
    and its container-path twin models.docker.config; returns the models.config path."""
    root = os.path.abspath(serving_root)
    specs = [ModelSpec(name=name, base_path=os.path.join(root, name),
                       version_policy="latest", num_latest=1)
             for name in _served_model_names(root)]
    write_model_server_config(os.path.join(root, DOCKER_MODELS_CONFIG),
                              container_config(specs, root))
    return write_model_server_config(os.path.join(root, MODELS_CONFIG), specs)


def run_pusher(model_dirs: Mapping[str, str], evaluation_dir: str, serving_root: str,
               output_dir: str, config: PushConfig) -> PushResult:
    """Pushes each blessed model as a new version and rewrites models.config.

    `model_dirs` maps model name to its trainer output directory (holding serving_model/).
    Writes `output_dir/push.json` with the returned result.
    """
    if config.keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {config.keep_versions}")
    if not serving_root:
        raise ValueError("run_pusher needs a serving_root")
    blessings = _read_blessings(evaluation_dir)
    root = Path(serving_root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    outcomes: dict[str, ModelPush] = {}
    try:
        for name, model_dir in sorted(model_dirs.items()):
            outcomes[name] = _push_if_blessed(name, model_dir, blessings.get(name),
                                              evaluation_dir, root, config.keep_versions)
    finally:
        # Rewritten even when nothing was pushed or a later model failed, so the config
        # always lists exactly the models whose versions are in the directory.
        config_path = write_serving_config(str(root))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    push_json = str(Path(output_dir) / PUSH_FILE)
    docker_config = str(root / DOCKER_MODELS_CONFIG)
    # A local tensorflow_model_server reads host paths; the Docker image, container paths.
    serve_config = config_path if shutil.which("tensorflow_model_server") else docker_config
    result = PushResult(serving_root=str(root), models_config=config_path, models=outcomes,
                        push_json=push_json, docker_models_config=docker_config,
                        tfserving_command=docker_command(serve_config, str(root)))
    write_json_atomic(push_json, result)
    return result
