"""Runs the declared pipeline (`pipeline/dag.py`) over one run root, locally.

For each step: resolve its inputs to the URIs their producers committed, compute a cache
key (input fingerprints, parameters, the step's code), skip the step when ML Metadata has
a completed execution with that key whose output is still the committed one, otherwise run
its executor into a fresh execution directory and commit it (`core/artifacts.py`), then
record the execution and its artifacts in ML Metadata (`pipeline/metadata.py`).

The run root, the data and the serving root may be local paths or object-store URIs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import (EXECUTION_PREFIX, Commit, commit, fingerprint,
                                read_commit, relative_paths,
                                remove_uncommitted, to_jsonable)
from fer_pipeline.core.beam_job import BeamJobNotRun, translate_only
from fer_pipeline.core.config import MODEL_NAMES, PipelineConfig, resolve_schema_path
from fer_pipeline.core.contract import MANIFEST_FILE
from fer_pipeline.core.errors import UserError
from fer_pipeline.pipeline.dag import (DATA, KERAS_FILE, PIPELINE_INPUT, SCHEMA, STEP_NAMES, Step,
                                      StepEnv, build_steps, check_gate_labels, code_fingerprint,
                                      step_by_name)
from fer_pipeline.pipeline.metadata import DERIVED, ArtifactRecord, MetadataStore, sqlite_path

log = logging.getLogger(__name__)

SERVING_MODELS_DIR = "serving_models"


def schema_path(config: PipelineConfig) -> str:
    """The checked-in schema (by default the one shipped in the package, found from any
    working directory: core/config.py, resolve_schema_path)."""
    return resolve_schema_path(config.validation.schema_path)


class PipelineError(UserError, RuntimeError):
    """A step refused to go on (bad data, anomalies); the message says why and what to do."""


@dataclass
class RunContext:
    data_paths: Sequence[str]
    run_root: str
    config: PipelineConfig
    beam_args: list[str] = field(default_factory=list)
    force: bool = False
    models: tuple[str, ...] = MODEL_NAMES
    run_id: str = ""

    def __post_init__(self) -> None:
        # Every record (commit records, manifests, ML Metadata) holds absolute URIs, so any
        # command works from any directory, whichever one the run was started from.
        self.run_root = fileio.absolute(self.run_root)
        self.data_paths = [fileio.absolute(path) for path in self.data_paths]

    @property
    def serving_root(self) -> str:
        return fileio.absolute(self.config.push.serving_root
                               or fileio.join(self.run_root, SERVING_MODELS_DIR))

    @property
    def schema_path(self) -> str:
        return schema_path(self.config)

    def env(self) -> StepEnv:
        return StepEnv(self.config, list(self.beam_args), self.serving_root)

    def step_root(self, step: Step) -> str:
        return fileio.join(self.run_root, step.directory)


@dataclass
class StepOutcome:
    step: str
    uri: str                      # the committed execution directory
    skipped: bool
    manifest: dict[str, Any]
    commit: Commit


# ----------------------------------------------------------------------------- inputs

def _resolve_inputs(step: Step, ctx: RunContext, committed: Mapping[str, Commit]
                    ) -> tuple[dict[str, Any], dict[str, list[ArtifactRecord]]]:
    """Each input's value (URI, or list of URIs for the data) and its artifact records."""
    values: dict[str, Any] = {}
    records: dict[str, list[ArtifactRecord]] = {}
    for name, ref in step.inputs.items():
        if ref.startswith(PIPELINE_INPUT + "."):
            values[name], records[name] = pipeline_input(ref, ctx.data_paths, ctx.config)
            continue
        producer, output = ref.split(".", 1)
        source = committed.get(producer) or read_commit(
            fileio.join(ctx.run_root, step_by_name(producer, ctx.models).directory))
        if source is None and name in step.optional_inputs:
            continue   # e.g. train without a tune step's output: the declared defaults
        if source is None:
            raise PipelineError(f"step {step.name!r} needs {ref!r}, but `{producer}` has "
                                f"no committed output under {ctx.run_root}: run "
                                f"`fer-pipeline {_command(producer)}` first "
                                f"(or `fer-pipeline run`)")
        values[name] = source.output_uri(output)
        records[name] = [ArtifactRecord(output, values[name],
                                        source.outputs[output]["fingerprint"])]
    return values, records


def pipeline_input(ref: str, data_paths: Sequence[str], config: PipelineConfig
                   ) -> tuple[Any, list[ArtifactRecord]]:
    """The value and artifact records of `pipeline.data` or `pipeline.schema`.

    Shared by the local runner and the Kubeflow components. One CSV is passed as a path
    (the component's simple signature); several go as a list.
    """
    if ref == SCHEMA:
        path = _require(schema_path(config), "the checked-in schema")
        return path, [ArtifactRecord("schema", path, fingerprint(path))]
    if ref.startswith(KERAS_FILE):
        return keras_file_input(ref[len(KERAS_FILE):], config)
    if ref != DATA:
        raise ValueError(f"unknown pipeline input {ref!r}")
    paths = check_data_paths(data_paths)
    records = [ArtifactRecord("data", fileio.absolute(p), fingerprint(p)) for p in paths]
    return (paths[0] if len(paths) == 1 else list(paths)), records


def keras_file_input(model: str, config: PipelineConfig) -> tuple[str, list[ArtifactRecord]]:
    """The Keras file imported as `model` (imports.<model>.keras_file), recorded with the
    sha256 of its bytes (what `sha256sum` prints), so lineage names the exact file."""
    given = config.imports[model].keras_file
    if not given:
        raise PipelineError(f"import-{model} needs a Keras file: `fer-pipeline import-model "
                            f"--name {model} --keras FILE --output RUN` (or "
                            f"imports.{model}.keras_file in --config)")
    path = _require(fileio.absolute(given), "--keras")
    digest = hashlib.sha256(fileio.read_bytes(path)).hexdigest()
    return path, [ArtifactRecord("keras_file", path, fingerprint(path),
                                 {"model": model, "sha256": digest})]


def check_data_paths(data_paths: Sequence[str]) -> list[str]:
    """The --data paths, each checked to exist; PipelineError naming it if not. A directory
    is a labelled image folder (ingest checks its layout)."""
    if not data_paths:
        raise PipelineError("ingest needs --data PATH (a FER-2013 format CSV or an image folder)")
    for path in data_paths:
        if not fileio.exists(path):
            raise PipelineError(f"--data {path}: no such file (for a synthetic FER-2013 CSV "
                                "to try the pipeline with: `fer-pipeline synth --out PATH`)")
        if fileio.isdir(path) and not any(fileio.isdir(fileio.join(path, name))
                                          for name in fileio.listdir(path)):
            raise PipelineError(f"--data {path} is a directory with no class folders in it; "
                                "give a FER-2013 CSV or a folder of labelled images (one "
                                "subfolder per class)")
    return list(data_paths)


def _require(path: str, what: str) -> str:
    if not fileio.exists(path):
        raise PipelineError(f"{what} {path} does not exist")
    return path


def _command(step_name: str) -> str:
    if step_name.startswith("tune-"):
        return "tune --model " + step_name.split("-", 1)[1]
    if step_name.startswith("import-"):
        return f"import-model --name {step_name.split('-', 1)[1]} --keras FILE"
    return "train --model " + step_name.split("-", 1)[1] if step_name.startswith("train-") \
        else step_name


def cache_key(step: Step, records: Mapping[str, list[ArtifactRecord]], parameters: Any,
              code: str) -> str:
    """Changes when an input's content, a parameter or the step's code changes."""
    payload = {"step": step.name, "code": code, "parameters": parameters,
               "inputs": {name: [r.fingerprint for r in rs] for name, rs in records.items()}}
    text = json.dumps(payload, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- one step

def execute(step: Step, inputs: Mapping[str, Any], output_uri: str, env: StepEnv
            ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """Runs the executor into `output_uri`; returns (result, outputs with fingerprints).

    Shared by the local runner and the Kubeflow components, so both write the same files.
    """
    fileio.makedirs(output_uri)
    result = relative_paths(to_jsonable(step.executor(inputs, output_uri, env)), output_uri)
    outputs = {}
    for name, sub in step.outputs.items():
        uri = fileio.join(output_uri, sub) if sub else output_uri
        outputs[name] = {"uri": uri, "fingerprint": fingerprint(uri)}
    return result, outputs


def write_manifest(step: Step, execution: str, key: str,
                   input_records: Mapping[str, list[ArtifactRecord]], parameters: Any,
                   code: str, result: dict[str, Any], outputs: dict[str, dict[str, str]],
                   started: float, output_uri: str) -> dict[str, Any]:
    """The human-readable record inside the execution directory (manifest.json)."""
    manifest = {
        "step": step.name, "execution": execution, "cache_key": key,
        "inputs": {name: [{"uri": r.uri, "fingerprint": r.fingerprint} for r in rs]
                   for name, rs in input_records.items()},
        "parameters": parameters, "code_fingerprint": code, "result": result,
        "outputs": outputs,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
    }
    fileio.write_json(fileio.join(output_uri, MANIFEST_FILE), manifest)
    return manifest


def run_step(step: Step, ctx: RunContext, store: MetadataStore,
             committed: Mapping[str, Commit]) -> StepOutcome:
    """Skips `step` when its cache key is committed and recorded; else runs and commits it.

    `committed` holds this run's commits so far (steps not run in this invocation are
    found through their commit records).
    """
    env = ctx.env()
    inputs, input_records = _resolve_inputs(step, ctx, committed)
    parameters = to_jsonable(step.parameters(ctx.config, env))
    code = code_fingerprint(step.code)
    key = cache_key(step, input_records, parameters, code)
    step_root = ctx.step_root(step)
    current = read_commit(step_root)
    if (not ctx.force and current is not None and current.cache_key == key
            and store.find_completed(step.name, key) is not None):
        log.info("step %s: inputs, parameters and code unchanged; skipping", step.name)
        return StepOutcome(step.name, current.uri, True, current.manifest, current)

    execution = EXECUTION_PREFIX + key[len("sha256:"):][:12]
    if current is not None and current.execution == execution:
        # --force over a committed output: never overwrite what readers trust.
        execution += time.strftime("-%Y%m%dT%H%M%S")
    output_uri = fileio.join(step_root, execution)
    if fileio.exists(output_uri) and not (step.resumable and not ctx.force):
        fileio.rmtree(output_uri)
    started = time.time()
    try:
        result, outputs = execute(step, inputs, output_uri, env)
        input_records = with_result_inputs(step, input_records, result)
    except BaseException as error:
        # A failed attempt leaves nothing behind (readers never trusted it anyway), unless
        # its error points the user at a report it wrote there (ingest's rejected rows);
        # a resumable step keeps its checkpoints for the next attempt.
        if (not step.resumable and output_uri not in str(error)
                and fileio.exists(output_uri)):
            fileio.rmtree(output_uri)
        raise
    manifest = write_manifest(step, execution, key, input_records, parameters, code, result,
                              outputs, started, output_uri)
    record = Commit(step.name, execution, output_uri, key, outputs, manifest)
    commit(step_root, record)   # written last: from here on readers see the new output
    record_metadata(step, store, input_records, record, result)
    remove_uncommitted(step_root)
    return StepOutcome(step.name, output_uri, False, manifest, record)


def with_result_inputs(step: Step, records: Mapping[str, list[ArtifactRecord]],
                       result: dict[str, Any]) -> dict[str, list[ArtifactRecord]]:
    """The step's inputs plus those its result names (a warm start's base version)."""
    extra = step.result_inputs(result) if step.result_inputs is not None else {}
    return {**records, **extra}


def record_metadata(step: Step, store: MetadataStore,
                     input_records: Mapping[str, list[ArtifactRecord]], record: Commit,
                     result: dict[str, Any]) -> None:
    """The execution, its input/output artifacts and derived artifacts in ML Metadata."""
    outputs = {name: [ArtifactRecord(name, out["uri"], out["fingerprint"])]
               for name, out in record.outputs.items()}
    if step.derived is not None:
        outputs[DERIVED] = step.derived(record.uri, result)
    store.record_execution(step.name, dict(input_records), outputs, {
        "cache_key": record.cache_key,
        "code_fingerprint": record.manifest["code_fingerprint"],
        "parameters": record.manifest["parameters"],
        "result": result,
        "duration_s": float(record.manifest["duration_s"]),
        "execution_dir": record.uri,
    })


def stop_if_blocking(outcome: StepOutcome) -> None:
    """A step whose result says `blocking` (validation anomalies) stops the run, after
    its output is committed so the report is there to read."""
    result = outcome.manifest.get("result", {})
    if not isinstance(result, dict) or not result.get("blocking"):
        return
    report = result.get("report_path")
    text = result.get("summary", "")
    if report:
        report = fileio.join(outcome.uri, report)
        if fileio.exists(report):
            text = fileio.read_text(report)
    raise PipelineError(
        f"data validation found anomalies; the run stops here.\n{text}\n"
        f"Full report: {report}. If this data is expected, re-run with --allow-anomalies.")


# ----------------------------------------------------------------------------- the run

def open_store(ctx: RunContext) -> MetadataStore:
    return MetadataStore(ctx.config.metadata, ctx.run_root, ctx.run_id)


def run_pipeline(ctx: RunContext, steps: Optional[Sequence[str]] = None) -> list[StepOutcome]:
    """Runs `steps` (default: all) in pipeline order and returns what each did."""
    declared = build_steps(ctx.models)
    names = [s.name for s in declared]
    wanted = set(steps or names)
    unknown = wanted - set(STEP_NAMES) - set(names)
    if unknown:
        raise PipelineError(f"unknown steps {sorted(unknown)}; steps are {list(STEP_NAMES)}")
    chosen = [step for step in declared if step.name in wanted]
    off = [step for step in chosen if not step.is_enabled(ctx.config)]
    if off and not steps:   # a step that is off (tune) runs only when asked for by name
        print(f"[fer-pipeline] {', '.join(s.name for s in off)}: off (--tune, or "
              f"{off[0].command}.enabled: true in --config, turns "
              f"{'them' if len(off) > 1 else 'it'} on)", flush=True)
        chosen = [step for step in chosen if step not in off]
    check_gate_labels(ctx.config, [step.name for step in chosen])
    check_inputs_exist(chosen, ctx)   # before anything is created under the run root
    created = _not_yet_existing(ctx)
    store = open_store(ctx)
    committed: dict[str, Commit] = {}
    outcomes = []
    if translate_only(PipelineOptions(list(ctx.beam_args))):
        try:
            translate_steps(chosen, ctx, store)
        finally:
            _remove_created(created)   # nothing ran: a translation leaves no run behind
        return outcomes
    try:
        for step in chosen:
            outcome = run_step(step, ctx, store, committed)
            committed[step.name] = outcome.commit
            verb = "skipped (unchanged)" if outcome.skipped else (
                f"done in {outcome.manifest.get('duration_s', 0):.1f}s")
            print(f"[fer-pipeline] {step.name:<12} {verb:<22} {outcome.uri}", flush=True)
            outcomes.append(outcome)
            stop_if_blocking(outcome)
    except BaseException as error:
        if not committed:
            # What this run created goes, except a report its error points at.
            _remove_created([path for path in created if path not in str(error)])
        raise
    return outcomes


def translate_steps(steps: Sequence[Step], ctx: RunContext, store: MetadataStore) -> None:
    """A Dataflow translation without submission (`--template_location`, `--dry_run`):
    every Beam step among `steps` whose inputs exist writes its own template
    (core/beam_job.py `translation_args`), one line each. Nothing runs and nothing is
    committed, so a step whose input only a translated step would produce is named as not
    translated; the steps that are not Beam jobs (training, evaluation...) do not run."""
    forced = dataclasses.replace(ctx, force=True)   # a cached output translates nothing
    translated, not_translated = [], []
    for step in steps:
        if not step.beam:
            continue
        missing = [ref for name, ref in step.inputs.items()
                   if not ref.startswith(PIPELINE_INPUT + ".")
                   and name not in step.optional_inputs and read_commit(fileio.join(
                       ctx.run_root, step_by_name(ref.split(".")[0], ctx.models).directory))
                   is None]
        if missing:
            not_translated.append(f"{step.name} (needs {', '.join(missing)}, which only a run "
                                  "can produce)")
            continue
        try:
            run_step(step, forced, store, {})
        except BeamJobNotRun as done:
            where = (f"template {done.template}" if done.template
                     else "dry run, no template written")
            print(f"[fer-pipeline] {step.name:<12} {'translated':<22} {where}", flush=True)
            translated.append(step.name)
            continue
        raise RuntimeError(f"{step.name}: Dataflow was asked only to translate the job, "
                           "but the step ran")   # a bug of beam_pipeline's
    skipped = [s.name for s in steps if not s.beam]
    print(f"[fer-pipeline] Dataflow translation only: {len(translated)} Beam step(s) "
          "translated, nothing ran"
          + (f"; not translated: {'; '.join(not_translated)}" if not_translated else "")
          + (f"; not Beam jobs, not run: {', '.join(skipped)}" if skipped else ""), flush=True)


def check_inputs_exist(steps: Sequence[Step], ctx: RunContext) -> None:
    """Every input of `steps` exists: the --data files, and a committed output of every
    producer that is not among `steps` itself. Raises PipelineError saying what to run."""
    names = {step.name for step in steps}
    for step in steps:
        for ref in step.inputs.values():
            producer = ref.split(".", 1)[0]
            if ref == DATA:
                check_data_paths(ctx.data_paths)
            elif producer != PIPELINE_INPUT and producer not in names and \
                    ref not in (step.inputs[name] for name in step.optional_inputs):
                directory = step_by_name(producer, ctx.models).directory
                if read_commit(fileio.join(ctx.run_root, directory)) is None:
                    where = ("does not exist" if not fileio.exists(ctx.run_root) else
                             f"has no committed `{producer}` output")
                    raise PipelineError(
                        f"step {step.name!r} needs {ref!r}, but the run root {ctx.run_root} "
                        f"{where}: run `fer-pipeline {_command(producer)} --output "
                        f"{ctx.run_root}` first (or `fer-pipeline run`), or check --output")


def _not_yet_existing(ctx: RunContext) -> list[str]:
    """The local run root and SQLite metadata file, if this run is about to create them."""
    paths = []
    if not fileio.is_uri(ctx.run_root) and not os.path.exists(ctx.run_root):
        paths.append(ctx.run_root)
    if not ctx.config.metadata.mysql_host:
        database = sqlite_path(ctx.config.metadata, ctx.run_root)
        if not os.path.exists(database):
            paths.append(database)
    return paths


def _remove_created(paths: Sequence[str]) -> None:
    """A run that failed before committing anything leaves no trace of itself."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def committed_output(run_root: str, ref: str, models: Sequence[str] = MODEL_NAMES) -> str:
    """The committed URI of `step.output` (or of a step's whole output) under `run_root`."""
    producer, _, output = ref.partition(".")
    if producer.startswith("import-"):    # imported models' steps exist when named
        models = (*models, producer[len("import-"):])
    if producer not in STEP_NAMES and producer not in {s.name for s in build_steps(models)}:
        raise PipelineError(f"unknown step {producer!r}; steps are {list(STEP_NAMES)}")
    step = step_by_name(producer, models)
    if output and output not in step.outputs:
        raise PipelineError(f"step {producer!r} has no output {output!r}; its outputs are "
                            f"{', '.join(step.outputs)} (e.g. {producer}.{next(iter(step.outputs))})")
    run_root = fileio.absolute(run_root)
    if not fileio.exists(run_root):
        raise PipelineError(f"no run root at {run_root} (check --output)")
    record = read_commit(fileio.join(run_root, step.directory))
    if record is None:
        raise PipelineError(f"`{producer}` has no committed output under {run_root}")
    return record.uri if not output else record.output_uri(output)
