"""The declared pipeline as a Kubeflow Pipelines v2 definition.

`compile_pipeline()` turns `pipeline/dag.py`'s steps into one lightweight Python component
each and wires them by artifact: a step's whole-directory output is a KFP artifact, and a
downstream step receives its URI (gs://, s3:// or, in local mode, a path), so the same
executors the local runner uses run in the components (`run_component` below).

Pipeline parameters: `data` (JSON list of CSV URIs), `serving_root`, `config_json` (the
whole PipelineConfig, defaulting to the one compiled in), `beam_args_json` (Beam options for
the data steps, e.g. `["--runner=DataflowRunner", "--project=P", ...]`) and `metadata_db`
(an ML Metadata SQLite path shared by the components; empty: KFP's own metadata only).

KFP serializes a lightweight component from its function's source, so the component
functions are generated from the declaration as source text into a temporary module.
The components import this package: the image they run in must have it installed
(`Dockerfile`); `install_kfp_package=False` because that image already has kfp.
"""
# No `from __future__ import annotations`: KFP reads the pipeline function's annotations
# as types, and string annotations would be taken for artifact type names.

import importlib.util
import json
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

from fer_pipeline.core import tf_cpu
from fer_pipeline.core.config import MODEL_NAMES, PipelineConfig
from fer_pipeline.core.credentials import beam_args_from_environment, without_secrets
from fer_pipeline.pipeline.dag import PIPELINE_INPUT, Step, build_steps

# The components run steps in processes that import this module first (core/tf_cpu.py).
tf_cpu.prefer_onednn()

PIPELINE_NAME = "fer-pipeline"


def _function_name(step: Step) -> str:
    return step.name.replace("-", "_")


def _primary_output(step: Step) -> str:
    """The step's whole-directory output: the one KFP artifact it produces."""
    return next(name for name, sub in step.outputs.items() if sub == "")


def _artifact_inputs(step: Step, present: Optional[Sequence[str]] = None) -> list[str]:
    """The inputs that are other steps' artifacts; an optional one only when its producer
    is among `present` (the compiled steps; None: all)."""
    return [name for name, ref in step.inputs.items()
            if not ref.startswith(PIPELINE_INPUT + ".")
            and (present is None or name not in step.optional_inputs
                 or ref.split(".", 1)[0] in present)]


# The first lines of every component function: a component runs in a process of its own,
# so it installs core/quiet.py's filters itself, before anything imports TensorFlow.
_QUIET = ("    from fer_pipeline.core import quiet\n"
          "    quiet.install()\n")


def component_source(step: Step, present: Optional[Sequence[str]] = None) -> str:
    """Python source of the lightweight component that runs `step` (`present`: the steps
    compiled with it, which decide its optional inputs)."""
    artifact_params = [f"{name}: Input[Artifact]" for name in _artifact_inputs(step, present)]
    output = _primary_output(step)
    params = ", ".join(artifact_params + [
        "data: str", "serving_root: str", "config_json: str", "beam_args_json: str",
        "metadata_db: str", "models_json: str", f"{output}: Output[Artifact]"])
    uris = ", ".join(f"{name!r}: {name}.uri" for name in _artifact_inputs(step, present))
    return (
        f"def {_function_name(step)}({params}):\n"
        f"{_QUIET}"
        f"    from fer_pipeline.pipeline.kfp_pipeline import run_component\n"
        f"    run_component({step.name!r}, {{{uris}}}, {output}.uri, data, serving_root,\n"
        f"                  config_json, beam_args_json, metadata_db, models_json)\n"
    )


def _import_source(functions: str, module_name: str) -> Any:
    """Imports component functions given as source text (KFP serializes their source)."""
    source = "from kfp.dsl import Artifact, Input, Output\n\n\n" + functions
    directory = tempfile.mkdtemp(prefix="fer_kfp_")
    path = os.path.join(directory, f"{module_name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # inspect.getsource finds the file through sys.modules
    spec.loader.exec_module(module)
    return module


def _components(steps: Sequence[Step], image: str) -> dict[str, Any]:
    """Imports the generated component functions and wraps them with dsl.component."""
    from kfp import dsl

    present = [step.name for step in steps]
    module = _import_source("\n\n".join(component_source(step, present) for step in steps),
                            "fer_kfp_components")
    return {step.name: dsl.component(getattr(module, _function_name(step)),
                                     base_image=image, install_kfp_package=False)
            for step in steps}


def build_pipeline(config: PipelineConfig, models: Sequence[str] = MODEL_NAMES,
                   beam_args: Sequence[str] = (), image: str = "fer-pipeline:latest"):
    """A KFP pipeline function built from the declaration."""
    from kfp import dsl

    from fer_pipeline.core.artifacts import to_jsonable

    # A step that is off (tune, unless tune.enabled) is left out of the compiled pipeline.
    steps = [step for step in build_steps(models) if step.is_enabled(config)]
    present = [step.name for step in steps]
    components = _components(steps, image)
    default_config = json.dumps(to_jsonable(config))
    # Credentials never go into the YAML (core/credentials.py): the pods get them from
    # their environment.
    default_beam = json.dumps(without_secrets(beam_args)[0])
    models_json = json.dumps(list(models))

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="FER-2013 CSV to blessed models in a TF Serving directory")
    def fer_pipeline(data: str, serving_root: str, config_json: str = default_config,
                     beam_args_json: str = default_beam, metadata_db: str = ""):
        tasks: dict[str, Any] = {}
        for step in steps:
            kwargs: dict[str, Any] = {}
            for name in _artifact_inputs(step, present):
                producer = step.inputs[name].split(".", 1)[0]
                kwargs[name] = tasks[producer].outputs[_primary_output(
                    next(s for s in steps if s.name == producer))]
            task = components[step.name](
                data=data, serving_root=serving_root, config_json=config_json,
                beam_args_json=beam_args_json if step.beam else "[]",
                metadata_db=metadata_db, models_json=models_json, **kwargs)
            task.set_display_name(step.name)
            # Our own cache (ML Metadata, cache keys with code fingerprints) decides; KFP's
            # cache does not know that editing components/ changes a step.
            task.set_caching_options(False)
            tasks[step.name] = task

    return fer_pipeline


def compile_pipeline(path: str, config: Optional[PipelineConfig] = None,
                     models: Sequence[str] = MODEL_NAMES, beam_args: Sequence[str] = (),
                     image: str = "fer-pipeline:latest") -> str:
    """Writes the KFP v2 pipeline YAML to `path` and returns it."""
    from kfp import compiler

    from fer_pipeline.core.config import load_config

    pipeline_fn = build_pipeline(config or load_config(), models, beam_args, image)
    compiler.Compiler().compile(pipeline_fn, package_path=path)
    return path


# ----------------------------------------------------------------------------- bulk inference

INFERENCE_PIPELINE_NAME = "fer-bulk-inference"
# `fer-pipeline infer` as one component: it is not a step of the training DAG (it scores
# other data, with whatever is in serving), so it is a pipeline of its own.
INFERENCE_COMPONENT_SOURCE = (
    "def bulk_inference(data: str, serving_root: str, models: str, config_json: str,\n"
    "                   beam_args_json: str, metadata_db: str,\n"
    "                   predictions: Output[Artifact]):\n"
    + _QUIET +
    "    from fer_pipeline.pipeline.kfp_pipeline import run_inference_component\n"
    "    run_inference_component(data, serving_root, models, config_json, beam_args_json,\n"
    "                            metadata_db, predictions.uri)\n")


def build_inference_pipeline(config: PipelineConfig, beam_args: Sequence[str] = (),
                             image: str = "fer-pipeline:latest"):
    """A KFP pipeline function that runs bulk inference (pipeline/infer_command.py).

    Parameters: `data` (a CSV or a directory of photos), `serving_root`, `models`
    (`cnn,vgg16`, or `cnn:3` for a version; empty: what models.config serves),
    `config_json`, `beam_args_json`, `metadata_db`. The review queue is a local SQLite
    file, so it is not offered here: the flagged faces are in the output's predictions
    shards (`needs_review`).
    """
    from kfp import dsl

    from fer_pipeline.core.artifacts import to_jsonable

    component = dsl.component(
        _import_source(INFERENCE_COMPONENT_SOURCE, "fer_kfp_inference").bulk_inference,
        base_image=image, install_kfp_package=False)
    default_config = json.dumps(to_jsonable(config))
    # Credentials never go into the YAML (core/credentials.py): the pods get them from
    # their environment.
    default_beam = json.dumps(without_secrets(beam_args)[0])

    @dsl.pipeline(name=INFERENCE_PIPELINE_NAME,
                  description="Faces in a CSV or photos, scored by the served models on Beam")
    def fer_bulk_inference(data: str, serving_root: str, models: str = "",
                           config_json: str = default_config,
                           beam_args_json: str = default_beam, metadata_db: str = ""):
        task = component(data=data, serving_root=serving_root, models=models,
                         config_json=config_json, beam_args_json=beam_args_json,
                         metadata_db=metadata_db)
        task.set_display_name("infer")
        task.set_caching_options(False)   # the served versions change between runs

    return fer_bulk_inference


def compile_inference_pipeline(path: str, config: Optional[PipelineConfig] = None,
                               beam_args: Sequence[str] = (),
                               image: str = "fer-pipeline:latest") -> str:
    """Writes the bulk-inference KFP v2 pipeline YAML to `path` and returns it."""
    from kfp import compiler

    from fer_pipeline.core.config import load_config

    compiler.Compiler().compile(build_inference_pipeline(config or load_config(), beam_args,
                                                         image), package_path=path)
    return path


# ----------------------------------------------------------------------------- monitoring

MONITOR_PIPELINE_NAME = "fer-monitor"
# `fer-pipeline monitor` as one component: it judges what the server logged after a push,
# on a schedule, so like bulk inference it is a pipeline of its own.
MONITOR_COMPONENT_SOURCE = (
    "def monitor(run_root: str, logs: str, since: str, until: str, config_json: str,\n"
    "            metadata_db: str, monitoring: Output[Artifact]) -> str:\n"
    + _QUIET +
    "    from fer_pipeline.pipeline.kfp_pipeline import run_monitor_component\n"
    "    return run_monitor_component(run_root, logs, since, until, config_json,\n"
    "                                 metadata_db, monitoring.uri)\n")


def build_monitor_pipeline(config: PipelineConfig, image: str = "fer-pipeline:latest"):
    """A KFP pipeline function that runs the monitor (pipeline/monitor_command.py).

    Parameters: `run_root` (whose ML Metadata recorded the push), `logs` (comma-separated
    request log files or directories; empty: the serving root's models.config), `since` /
    `until` (ISO 8601 or a duration ago such as 2h), `config_json`, `metadata_db`. The
    component returns the verdict ("ok", "drift", "too few requests") for a condition that
    starts a retrain; it succeeds either way, since drift is a finding, not a failure.
    """
    from kfp import dsl

    from fer_pipeline.core.artifacts import to_jsonable

    component = dsl.component(
        _import_source(MONITOR_COMPONENT_SOURCE, "fer_kfp_monitor").monitor,
        base_image=image, install_kfp_package=False)
    default_config = json.dumps(to_jsonable(config))

    @dsl.pipeline(name=MONITOR_PIPELINE_NAME,
                  description="Served traffic against the training run of the served versions")
    def fer_monitor(run_root: str, logs: str = "", since: str = "", until: str = "",
                    config_json: str = default_config, metadata_db: str = ""):
        task = component(run_root=run_root, logs=logs, since=since, until=until,
                         config_json=config_json, metadata_db=metadata_db)
        task.set_display_name("monitor")
        task.set_caching_options(False)   # new requests arrive between runs

    return fer_monitor


def compile_monitor_pipeline(path: str, config: Optional[PipelineConfig] = None,
                             image: str = "fer-pipeline:latest") -> str:
    """Writes the monitoring KFP v2 pipeline YAML to `path` and returns it."""
    from kfp import compiler

    from fer_pipeline.core.config import load_config

    compiler.Compiler().compile(build_monitor_pipeline(config or load_config(), image),
                                package_path=path)
    return path


# ----------------------------------------------------------------------------- in the pod

def run_inference_component(data: str, serving_root: str, models: str, config_json: str,
                            beam_args_json: str, metadata_db: str, output_uri: str) -> None:
    """What the bulk-inference component runs: `fer-pipeline infer` into the artifact."""
    import dataclasses

    from fer_pipeline.core import fileio
    from fer_pipeline.core.config import load_config
    from fer_pipeline.pipeline.infer_command import run_inference_job

    config = load_config(overrides=json.loads(config_json))
    metadata = (dataclasses.replace(config.metadata, sqlite_path=metadata_db)
                if metadata_db else None)   # none given: KFP's own metadata only
    run_inference_job(data, _local_path(output_uri), fileio.absolute(serving_root),
                      [m for m in models.split(",") if m], config,
                      beam_args_from_environment(json.loads(beam_args_json)), metadata=metadata)


def run_monitor_component(run_root: str, logs: str, since: str, until: str,
                          config_json: str, metadata_db: str, output_uri: str) -> str:
    """What the monitoring component runs: `fer-pipeline monitor` into the artifact;
    returns the verdict."""
    import dataclasses

    from fer_pipeline.core.config import load_config
    from fer_pipeline.pipeline.monitor_command import parse_moment, run_monitor_job

    config = load_config(overrides=json.loads(config_json))
    metadata = (dataclasses.replace(config.metadata, sqlite_path=metadata_db)
                if metadata_db else None)   # none given: the run root's store
    result = run_monitor_job(run_root, [p for p in logs.split(",") if p],
                             _local_path(output_uri), config,
                             parse_moment(since) if since else None,
                             parse_moment(until) if until else None, metadata=metadata)
    print(f"[fer-pipeline] monitor: {result.summary}")
    return result.verdict


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def run_component(step_name: str, input_uris: dict[str, str], output_uri: str, data: str,
                  serving_root: str, config_json: str, beam_args_json: str,
                  metadata_db: str, models_json: str) -> None:
    """What every generated component runs: one declared step, by name.

    KFP publishes the output artifact only when the component succeeds, so the output is
    written in place; the manifest and (with `metadata_db`) the ML Metadata record are the
    same as the local runner's.
    """
    import dataclasses
    import time

    from fer_pipeline.core import fileio
    from fer_pipeline.core.artifacts import Commit, fingerprint, to_jsonable
    from fer_pipeline.core.config import load_config
    from fer_pipeline.pipeline.dag import StepEnv, code_fingerprint, step_by_name
    from fer_pipeline.pipeline.metadata import ArtifactRecord, MetadataStore
    from fer_pipeline.pipeline.runner import (StepOutcome, cache_key, execute, pipeline_input,
                                 record_metadata, stop_if_blocking, with_result_inputs,
                                 write_manifest)

    models = tuple(json.loads(models_json))
    step = step_by_name(step_name, models)
    config = load_config(overrides=json.loads(config_json))
    env = StepEnv(config, beam_args_from_environment(json.loads(beam_args_json)), fileio.absolute(serving_root))
    inputs: dict[str, Any] = {}
    records: dict[str, list[ArtifactRecord]] = {}
    data_paths = json.loads(data) if data.strip().startswith("[") else data.split(",")
    for name, ref in step.inputs.items():
        if ref.startswith(PIPELINE_INPUT + "."):
            inputs[name], records[name] = pipeline_input(ref, data_paths, config)
            continue
        if name not in input_uris and name in step.optional_inputs:
            continue   # its producer was not compiled into this pipeline (tune: off)
        producer, output = ref.split(".", 1)
        sub = step_by_name(producer, models).outputs[output]
        base = _local_path(input_uris[name])
        inputs[name] = fileio.join(base, sub) if sub else base
        records[name] = [ArtifactRecord(output, inputs[name], fingerprint(inputs[name]))]
    output_uri = _local_path(output_uri)
    parameters = to_jsonable(step.parameters(config, env))
    code = code_fingerprint(step.code)
    key = cache_key(step, records, parameters, code)
    started = time.time()
    result, outputs = execute(step, inputs, output_uri, env)
    records = with_result_inputs(step, records, result)
    manifest = write_manifest(step, "kfp", key, records, parameters, code, result, outputs,
                              started, output_uri)
    record = Commit(step.name, "kfp", output_uri, key, outputs, manifest)
    if metadata_db:
        store = MetadataStore(dataclasses.replace(config.metadata, sqlite_path=metadata_db),
                              output_uri, run_id=os.environ.get("KFP_RUN_ID", ""))
        record_metadata(step, store, records, record, result)
    stop_if_blocking(StepOutcome(step.name, output_uri, False, manifest, record))
