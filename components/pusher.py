"""Pusher: publishes blessed models into the directory TF Serving reads.

Layout (TF Serving's): `<serving_root>/<model>/<integer version>/saved_model.pb + variables/`
and `<serving_root>/models.config`. The serving root is a local directory or an object-store
URI (s3://, gs://); the trained models may be either too.

Publication: a version must never be visible to TF Serving before it is complete.

- Local serving root: a version is copied into a hidden sibling (`.tmp-<version>-<random>`;
  TF Serving ignores names that are not integers), fsynced, and renamed into place with one
  `os.rename`, so an integer directory is always complete. models.config names each model
  with the `latest` policy (one version); a server polling the directory loads the new
  version as soon as the rename happens. A crashed push leaves only a hidden temp directory,
  which the next push removes. models.config is written to a temp file and renamed over.
- Object-store serving root: there is no rename, and a prefix becomes visible object by
  object while it uploads. The version is uploaded to its integer prefix completely first;
  only then is models.config rewritten (last, as one object: an object is visible only once
  its upload completed) to name it, with the `specific` policy listing exactly the
  complete versions (the newest `keep_versions`), so TF Serving loads nothing models.config
  does not name. A crashed upload leaves an integer prefix that models.config does not
  name: the next push numbers its version above every integer prefix present (never
  reusing a number something was uploaded to) and deletes the leftover once the new config
  is written. Pruned versions are dropped from models.config before they are deleted.
  TF Serving with `specific` loads every named version; requests without a version get
  the highest.

Request logs (`push.request_log_dir`; `fer-pipeline push --request-log-dir DIR
--request-log-sampling-rate R`): models.config gives every model a `logging_config`, so
fer-serve logs a sampled PredictionLog per request under `DIR/<model>/`. The released
tensorflow_model_server refuses to start with a logging_config, so the config written for
it, models.docker.config, never has one (on an object store, where TF Serving otherwise
reads models.config itself, that twin is written only when request logs are on).

One push at a time per serving root (the pipeline runs one push step). Only models the
evaluator blessed (`<evaluation_dir>/blessings.json`) are pushed; refusals carry the
evaluator's reasons. Given the infra-validate step's output (the pipeline always gives it),
a model must also be infra-blessed (`infra_blessings.json`), and what is published is the
copy the sandboxed server loaded (`<infra_validation_dir>/<model>/serving_model/`: the
candidate plus its warm-up requests). A blessed candidate byte-identical to the version already served
(same content fingerprint, model cards aside) is not pushed again.

Model cards: every version published gets `assets.extra/model_card.json` (Model Card
Toolkit's schema) and `model_card.html` (core/model_card.py, core/model_card_page.py),
written into the version before it becomes visible (local: into the hidden copy before the
rename; object store: uploaded before models.config names the version), so a version and
its card appear together. The card is read from the evaluation, infra validation and model
step outputs this step is given; the push step's own report.html is the evaluation report
with a section linking every card published.
"""
from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from fer_pipeline.core import fileio
from fer_pipeline.core.config import PushConfig
from fer_pipeline.core.contract import (MODELS_CONFIG, DOCKER_MODELS_CONFIG, SERVING_MODEL_DIR,
    BLESSINGS_FILE, INFRA_BLESSINGS_FILE, PUSH_FILE)
from fer_pipeline.core.errors import ConfigError, MissingInputError, ResourceError
from fer_pipeline.core.model_card import CARD_DIR, CARD_HTML, content_fingerprint
from fer_pipeline.core.model_card_page import card_writer, write_report_with_cards
from fer_pipeline.core.serving_root import (ModelSpec, RequestLogSpec, configured_models,
                                           container_config, docker_command,
                                           latest_served_version, model_names_on_disk,
                                           served_versions, version_dirs,
                                           without_request_log, write_model_server_config)

__all__ = ["run_pusher", "PushResult", "ModelPush"]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"                  # in-flight copies (local serving roots)
DELETE_PREFIX = ".deleting-"           # old versions being removed (local serving roots)
SAVED_MODEL_FILE = "saved_model.pb"
REQUEST_LOG_FILE_PREFIX = "requests"   # <request_log_dir>/<model>/requests-<start>-...


@dataclass
class ModelPush:
    pushed: bool
    version: Optional[int] = None      # the new version, when pushed
    path: Optional[str] = None         # serving_root/<name>/<version>, when pushed
    reasons: list[str] = field(default_factory=list)   # the evaluator's verdict either way
    removed_versions: list[int] = field(default_factory=list)  # pruned by keep_versions
    removed_leftovers: list[int] = field(default_factory=list)  # crashed uploads deleted
    model_card: Optional[str] = None   # <path>/assets.extra/model_card.html, when pushed


@dataclass
class PushResult:
    serving_root: str
    models_config: str
    models: dict[str, ModelPush]
    push_json: str
    docker_models_config: str = ""
    tfserving_command: str = ""         # serves serving_root with the real TF Serving


# ----------------------------------------------------------------------------- copying

def _fsync_path(path: str) -> None:
    """Flushes a file's or directory's metadata to disk (a rename is only durable then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: str, dst: str) -> str:
    """Copies one file (either side local or a URI); a local copy is fsynced.

    Tests replace this to inject a crash mid-copy.
    """
    fileio.copy_file(src, dst)
    if not fileio.is_uri(dst):
        _fsync_path(dst)
    return dst


def _copy_tree(source: str, target: str) -> None:
    # Looked up at call time, so a test's replacement of _copy_file takes effect.
    for rel, full in fileio.walk_files(source):
        _copy_file(full, fileio.join(target, *rel.split("/")))


# ----------------------------------------------------------------------------- local root

def _fsync_tree(root: str) -> None:
    # Files were fsynced as they were copied; directory entries need their own fsync.
    for dirpath, _, _ in os.walk(root):
        _fsync_path(dirpath)


def _remove_stale_temps(model_root: str) -> list[str]:
    """Removes hidden leftovers of a crashed earlier push or prune; returns their names."""
    removed = []
    for entry in os.listdir(model_root):
        if entry.startswith((TEMP_PREFIX, DELETE_PREFIX)):
            log.warning("removing leftover %s from an interrupted push",
                        os.path.join(model_root, entry))
            shutil.rmtree(os.path.join(model_root, entry), ignore_errors=True)
            removed.append(entry)
    return removed


# version, its final path -> {relative path: bytes} written into the version (model cards)
Extras = Callable[[int, str], dict[str, bytes]]


def _write_extras(extras: Optional[Extras], version: int, final: str, target: str) -> None:
    for rel, data in (extras(version, final) if extras else {}).items():
        path = fileio.join(target, *rel.split("/"))
        fileio.write_bytes(path, data)
        if not fileio.is_uri(path):
            _fsync_path(path)


def _publish_local(source: str, model_root: str, version: int,
                   extras: Optional[Extras] = None) -> str:
    """Copies `source` (and `extras`) to `model_root/<version>` so that it appears
    complete or not at all."""
    target = os.path.join(model_root, str(version))
    temp = os.path.join(model_root, f"{TEMP_PREFIX}{version}-{secrets.token_hex(4)}")
    try:
        _copy_tree(source, temp)
        _write_extras(extras, version, target, temp)
        _fsync_tree(temp)
        os.rename(temp, target)   # fails rather than merging if `target` appeared meanwhile
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # best effort; the next push cleans up anyway
        raise
    _fsync_path(model_root)
    return target


def _prune_local(model_root: str, keep: int) -> list[int]:
    """Deletes all but the newest `keep` versions; returns the removed version numbers."""
    versions = version_dirs(os.path.dirname(model_root), os.path.basename(model_root))
    doomed = versions[:-keep] if keep < len(versions) else []
    for version in doomed:
        # Rename first so a half-deleted version is never visible under an integer name.
        hidden = os.path.join(model_root, f"{DELETE_PREFIX}{version}-{secrets.token_hex(4)}")
        os.rename(os.path.join(model_root, str(version)), hidden)
        shutil.rmtree(hidden)
    return doomed


def _push_local(name: str, source: str, root: str, keep: int,
                extras: Optional[Extras] = None) -> ModelPush:
    model_root = os.path.join(root, name)
    os.makedirs(model_root, exist_ok=True)
    _remove_stale_temps(model_root)
    existing = version_dirs(root, name)
    version = existing[-1] + 1 if existing else 1
    target = _publish_local(source, model_root, version, extras)
    removed = _prune_local(model_root, keep)
    log.info("pushed %s as version %d (%s); removed old versions %s", name, version, target,
             removed)
    return ModelPush(pushed=True, version=version, path=target, removed_versions=removed)


def request_log_spec(name: str, config: Optional[PushConfig]) -> Optional[RequestLogSpec]:
    """The logging_config models.config gives `name` (None without push.request_log_dir):
    fer-serve logs its requests to <request_log_dir>/<name>/requests-*.tfrecord."""
    if config is None or not config.request_log_dir:
        return None
    if fileio.is_uri(config.request_log_dir):
        raise ConfigError(f"push.request_log_dir must be a local directory of the serving "
                          f"machine (fer-serve writes its request logs there), got "
                          f"{config.request_log_dir}")
    prefix = os.path.join(os.path.abspath(config.request_log_dir), name,
                          REQUEST_LOG_FILE_PREFIX)
    return RequestLogSpec(prefix, config.request_log_sampling_rate)


def write_serving_config(serving_root: str, config: Optional[PushConfig] = None) -> str:
    """Writes a local serving_root/models.config for every model present there (latest
    version, and request logs when `config.request_log_dir` is set), and its container-path
    twin models.docker.config (never with request logs, which the released TF Serving
    refuses); returns the models.config path."""
    root = os.path.abspath(serving_root)
    specs = [ModelSpec(name=name, base_path=os.path.join(root, name),
                       version_policy="latest", num_latest=1,
                       request_log=request_log_spec(name, config))
             for name in model_names_on_disk(root)]
    write_model_server_config(os.path.join(root, DOCKER_MODELS_CONFIG),
                              container_config(specs, root))
    return write_model_server_config(os.path.join(root, MODELS_CONFIG), specs)


# ----------------------------------------------------------------------------- object store

@dataclass
class _StorePlan:
    """What models.config on an object store will name: complete versions per model."""
    root: str
    keep: int
    complete: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str, keep: int) -> "_StorePlan":
        specs = configured_models(root) or {}
        return cls(root, keep, {name: served_versions(root, name) for name in specs})

    def kept(self, name: str) -> list[int]:
        return sorted(self.complete.get(name, []))[-self.keep:]


def _push_to_store(name: str, source: str, plan: _StorePlan,
                   extras: Optional[Extras] = None) -> ModelPush:
    """Uploads `source` as a new version; models.config names it later (see the module doc)."""
    present = version_dirs(plan.root, name) + plan.complete.get(name, [])
    version = max(present, default=0) + 1    # above any leftover: numbers are never reused
    target = fileio.join(plan.root, name, str(version))
    _copy_tree(source, target)
    _write_extras(extras, version, target, target)
    # The SavedModel must be there in full before the config may name it.
    if not fileio.exists(fileio.join(target, SAVED_MODEL_FILE)):
        raise ResourceError(f"upload of {source} to {target} is incomplete")
    plan.complete.setdefault(name, []).append(version)
    log.info("uploaded %s version %d (%s)", name, version, target)
    return ModelPush(pushed=True, version=version, path=target)


def write_store_config(plan: _StorePlan, config: Optional[PushConfig] = None) -> str:
    """Writes models.config naming exactly each model's kept complete versions. With
    request logs, TF Serving gets a twin without them, models.docker.config (same URIs)."""
    specs = [ModelSpec(name=name, base_path=fileio.join(plan.root, name),
                       version_policy="specific", versions=plan.kept(name),
                       request_log=request_log_spec(name, config))
             for name in sorted(plan.complete) if plan.kept(name)]
    twin = fileio.join(plan.root, DOCKER_MODELS_CONFIG)
    if any(spec.request_log for spec in specs):
        write_model_server_config(twin, [without_request_log(spec) for spec in specs])
    elif fileio.exists(twin):
        fileio.remove(twin)   # left from a push with request logs: it would go stale
    return write_model_server_config(fileio.join(plan.root, MODELS_CONFIG), specs)


def _delete_unnamed_versions(plan: _StorePlan, outcomes: dict[str, ModelPush]) -> None:
    """After models.config is written: deletes pruned versions and crashed uploads."""
    for name in model_names_on_disk(plan.root):
        kept = set(plan.kept(name))
        complete = set(plan.complete.get(name, []))
        for version in version_dirs(plan.root, name):
            if version in kept:
                continue
            fileio.rmtree(fileio.join(plan.root, name, str(version)))
            outcome = outcomes.get(name)
            if version in complete:
                log.info("pruned %s version %d", name, version)
                if outcome is not None:
                    outcome.removed_versions.append(version)
            else:
                log.warning("deleted %s version %d: an upload that never completed", name,
                            version)
                if outcome is not None:
                    outcome.removed_leftovers.append(version)


# ----------------------------------------------------------------------------- entry point

def _read_blessings(evaluation_dir: str) -> dict[str, dict]:
    path = fileio.join(evaluation_dir, BLESSINGS_FILE)
    if not fileio.exists(path):
        raise MissingInputError(f"{path} not found: run the evaluator before the pusher")
    return fileio.read_json(path)


def _read_infra_blessings(infra_validation_dir: str) -> dict[str, dict]:
    path = fileio.join(infra_validation_dir, INFRA_BLESSINGS_FILE)
    if not fileio.exists(path):
        raise MissingInputError(f"{path} not found: run infra-validate before the pusher")
    return fileio.read_json(path)


def _candidate(name: str, model_dir: str) -> str:
    source = fileio.join(model_dir, SERVING_MODEL_DIR)
    if not fileio.exists(fileio.join(source, SAVED_MODEL_FILE)):
        raise MissingInputError(f"model {name!r}: no SavedModel at {source}")
    return source


def _identical_served_version(source: str, root: str, name: str) -> Optional[int]:
    """The served version whose files equal `source`'s byte for byte (its model card
    aside: the pusher wrote that), if the newest does."""
    latest = latest_served_version(root, name)
    if latest is None or content_fingerprint(latest[1]) != content_fingerprint(source):
        return None
    return latest[0]



def _infra_refusal(name: str, infra_validation_dir: str,
                   infra_verdict: Optional[dict]) -> Optional[ModelPush]:
    """Why a model the evaluator blessed still may not be pushed: no infra blessing."""
    if infra_verdict is None:
        return ModelPush(pushed=False, reasons=[
            f"no infra blessing recorded for {name!r} in "
            f"{infra_validation_dir}/{INFRA_BLESSINGS_FILE}"])
    if not infra_verdict.get("blessed", False):
        # The infra validator logged why; the CLI prints its summary line.
        log.info("not pushing %s: %s", name, infra_verdict.get("summary", ""))
        return ModelPush(pushed=False, reasons=["not infra-blessed"]
                         + list(infra_verdict.get("reasons", [])))
    return None


def _push_if_blessed(name: str, model_dir: str, verdict: Optional[dict], evaluation_dir: str,
                     root: str, keep: int, plan: Optional[_StorePlan],
                     infra_validation_dir: Optional[str] = None,
                     infra_verdict: Optional[dict] = None, output_dir: str = "") -> ModelPush:
    if verdict is None:
        return ModelPush(pushed=False, reasons=[
            f"no blessing recorded for {name!r} in {evaluation_dir}/{BLESSINGS_FILE}"])
    reasons = list(verdict.get("reasons", []))
    if not verdict.get("blessed", False):
        # The gate's verdict, not a fault: the CLI prints it as one line already.
        log.info("not pushing %s: %s", name, "; ".join(reasons))
        return ModelPush(pushed=False, reasons=["not blessed"] + reasons)
    card = card_writer(name, model_dir, evaluation_dir, infra_validation_dir, output_dir)
    if infra_validation_dir is not None:
        refusal = _infra_refusal(name, infra_validation_dir, infra_verdict)
        if refusal is not None:
            return refusal
        # Publish what the sandboxed server loaded and answered from, warm-up included.
        model_dir = fileio.join(infra_validation_dir, name)
        reasons.append(infra_verdict.get("summary", ""))
    source = _candidate(name, model_dir)
    same = _identical_served_version(source, root, name)
    if same is not None:
        log.info("not pushing %s: identical to served version %d", name, same)
        return ModelPush(pushed=False, reasons=[f"identical to served version {same}"] + reasons)
    outcome = (_push_to_store(name, source, plan, card) if plan is not None
               else _push_local(name, source, root, keep, card))
    outcome.reasons = reasons
    if card is not None:
        outcome.model_card = fileio.join(outcome.path, CARD_DIR, CARD_HTML)
    return outcome


def run_pusher(model_dirs: Mapping[str, str], evaluation_dir: str,
               infra_validation_dir: Optional[str], serving_root: str, output_dir: str,
               config: PushConfig) -> PushResult:
    """Pushes each blessed model as a new version and rewrites models.config.

    `model_dirs` maps model name to its trainer output directory (holding serving_model/).
    With `infra_validation_dir` (the infra-validate step's output), a model must be
    infra-blessed too, and its validated copy is what gets pushed (module docstring).
    Writes `output_dir/push.json` with the returned result.
    """
    if config.keep_versions < 1:
        raise ConfigError(f"keep_versions must be >= 1, got {config.keep_versions}")
    if not serving_root:
        raise ValueError("run_pusher needs a serving_root")
    blessings = _read_blessings(evaluation_dir)
    request_log_spec("", config)   # a bad request_log_dir fails before anything is pushed
    infra_blessings = (_read_infra_blessings(infra_validation_dir)
                       if infra_validation_dir is not None else {})
    # realpath: models.config must name the directory TF Serving will actually poll.
    root = serving_root if fileio.is_uri(serving_root) else os.path.realpath(serving_root)
    fileio.makedirs(root)
    plan = _StorePlan.read(root, config.keep_versions) if fileio.is_uri(root) else None

    outcomes: dict[str, ModelPush] = {}
    try:
        for name, model_dir in sorted(model_dirs.items()):
            outcomes[name] = _push_if_blessed(name, model_dir, blessings.get(name),
                                              evaluation_dir, root, config.keep_versions, plan,
                                              infra_validation_dir, infra_blessings.get(name),
                                              output_dir)
    finally:
        # Rewritten even when nothing was pushed or a later model failed, so the config
        # always names exactly the complete versions present.
        config_path = (write_serving_config(root, config) if plan is None
                       else write_store_config(plan, config))
    if plan is not None:
        _delete_unnamed_versions(plan, outcomes)
    write_report_with_cards([d for d in (infra_validation_dir, evaluation_dir) if d], output_dir,
                            {name: (o.version, o.model_card) for name, o in outcomes.items()
                             if o.pushed and o.model_card})
    return _record(root, config_path, outcomes, output_dir, bool(config.request_log_dir))


def _record(root: str, config_path: str, outcomes: dict[str, ModelPush],
            output_dir: str, request_logs: bool = False) -> PushResult:
    push_json = fileio.join(output_dir, PUSH_FILE)
    local_binary = shutil.which("tensorflow_model_server")
    if fileio.is_uri(root):
        # TF Serving reads the URIs in models.config itself: no mount, no path rewriting
        # (but with request logs, the twin without logging_config).
        docker_config = serve_config = (fileio.join(root, DOCKER_MODELS_CONFIG)
                                        if request_logs else config_path)
    else:
        docker_config = os.path.join(root, DOCKER_MODELS_CONFIG)
        # A local tensorflow_model_server reads host paths; the Docker image, container paths.
        serve_config = config_path if local_binary else docker_config
    command = docker_command(serve_config, root)
    if request_logs and local_binary and not fileio.is_uri(root):
        # The host-path config carries logging_config, which the binary refuses; fer-serve
        # --server tfserving runs it on a copy without.
        command = shlex.join(["fer-serve", "--server", "tfserving", "--model-config",
                              config_path])
    result = PushResult(serving_root=root, models_config=config_path, models=outcomes,
                        push_json=push_json, docker_models_config=docker_config,
                        tfserving_command=command)
    fileio.write_json(push_json, result)
    return result
