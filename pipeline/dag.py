"""The pipeline, declared once.

Every step says what it reads (other steps' outputs, by `step.output` name, or the
pipeline's own inputs `pipeline.data` / `pipeline.schema`), what it writes, which config
section it takes, and which code it runs. The local runner (`pipeline/runner.py`), the CLI
(`fer-pipeline <step>`, `--steps`) and the Kubeflow pipeline (`pipeline/kfp_pipeline.py`)
are all built from `build_steps()`; nothing else lists the steps.

Executors adapt the declaration to each component's public entry point: they take the
resolved input URIs, the execution's output directory and the `StepEnv`, and return the
component's result record. They live here, at module level, so they pickle and import by
name (Beam workers and KFP components import them).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from fer_pipeline.core import fileio
from fer_pipeline.core.artifacts import fingerprint
from fer_pipeline.core.config import IMPORTED_NAMES, MODEL_NAMES, PipelineConfig
from fer_pipeline.core.contract import (BLESSINGS_FILE, INFRA_BLESSINGS_FILE, SERVING_MODEL_DIR,
                               TRANSFORM_GRAPH_DIR, TRANSFORMED_DIR)
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.pipeline.metadata import ArtifactRecord

PIPELINE_INPUT = "pipeline"           # producer name of the pipeline's own inputs
DATA = f"{PIPELINE_INPUT}.data"       # the FER-2013 CSV(s)
SCHEMA = f"{PIPELINE_INPUT}.schema"   # the checked-in schema
KERAS_FILE = f"{PIPELINE_INPUT}.keras_"  # + imported model name: its Keras file (import-model)


@dataclass
class StepEnv:
    """What an executor needs besides its inputs: the config, Beam's flags, where to push."""
    config: PipelineConfig
    beam_args: list[str] = field(default_factory=list)
    serving_root: str = ""


Executor = Callable[[Mapping[str, Any], str, StepEnv], Any]


@dataclass(frozen=True)
class Step:
    name: str                          # what --steps and `fer-pipeline <command>` use
    directory: str                     # under the run root, e.g. "examples", "models/cnn"
    inputs: Mapping[str, str]          # input name -> "step.output" | "pipeline.data|schema"
    outputs: Mapping[str, str]         # output name -> path inside the execution directory
    executor: Executor
    parameters: Callable[[PipelineConfig, StepEnv], Any]  # what the cache key includes
    code: tuple[str, ...]              # modules whose source goes into the cache key
    description: str
    beam: bool = False                 # takes Beam pipeline options (runner flags)
    resumable: bool = False            # a killed attempt's directory is reused (checkpoints)
    model: Optional[str] = None        # for per-model steps
    # Artifacts the step's result describes beyond its outputs (blessings, pushed versions),
    # recorded in ML Metadata: derived(output_uri, result) -> [ArtifactRecord].
    derived: Optional[Callable[[str, dict], list[ArtifactRecord]]] = None
    # Inputs the step runs without when their producer has no committed output (train
    # without tune): the step gets no such key, and the cache key leaves it out.
    optional_inputs: tuple[str, ...] = ()
    # Whether `fer-pipeline run` runs the step without being asked for it by name (tune:
    # tune.enabled or `run --tune`); None: always.
    enabled: Optional[Callable[[PipelineConfig], bool]] = None
    # Inputs the step's result names (train's warm-start base version), recorded with
    # its declared ones in the manifest and ML Metadata: result_inputs(result) -> records.
    result_inputs: Optional[Callable[[dict], dict[str, list[ArtifactRecord]]]] = None

    @property
    def command(self) -> str:
        """The `fer-pipeline` command that runs it: per-model steps share one (tune-cnn and
        tune-vgg16 are `tune --model NAME`)."""
        return self.name[:-len(self.model) - 1] if self.model else self.name

    def is_enabled(self, config: PipelineConfig) -> bool:
        return self.enabled is None or self.enabled(config)

    def upstream(self) -> list[str]:
        return sorted({ref.split(".")[0] for ref in self.inputs.values()} - {PIPELINE_INPUT})


# ----------------------------------------------------------------------------- executors

def _ingest(inputs, out, env: StepEnv):
    from fer_pipeline.components.example_gen import run_example_gen
    return run_example_gen(inputs["data"], out, env.config.ingest, env.beam_args)


def _augment(inputs, out, env: StepEnv):
    from fer_pipeline.components.augment import run_augment
    return run_augment(inputs["examples"], out, env.config.augment, env.beam_args)


def _statistics(inputs, out, env: StepEnv):
    from fer_pipeline.components.statistics.executor import run_statistics
    # The schema and validation settings let the page show the verdict at its top.
    return run_statistics(inputs["examples"], inputs["augmented"], inputs["schema"], out,
                          env.config.validation, env.beam_args)


def _validate(inputs, out, env: StepEnv):
    from fer_pipeline.components.validation import run_validation
    return run_validation(inputs["statistics"], inputs["schema"], out, env.config.validation)


def _transform(inputs, out, env: StepEnv):
    from fer_pipeline.components.transform import run_transform
    return run_transform(inputs["augmented"], inputs["examples"], out, env.config.transform,
                         env.beam_args)


def _tune(model: str, inputs, out, env: StepEnv):
    from fer_pipeline.components.tuner import run_tuner
    return run_tuner(inputs["transform"], out, env.config.tune, env.config.train, model,
                     report=_say)


def _train(model: str, inputs, out, env: StepEnv):
    from fer_pipeline.components.trainer.executor import run_trainer
    return run_trainer(inputs["transform"], out, env.config.train, model,
                       tuning_dir=inputs.get("tuning"), serving_root=env.serving_root,
                       report=lambda line: _say(f"train-{model}: {line}"))


def _say(line: str) -> None:
    print(f"[fer-pipeline] {line}", flush=True)


def _base_model(result: dict) -> dict[str, list[ArtifactRecord]]:
    """The served version a warm-started training run began from: the same ML Metadata
    artifact the push that published it recorded (type, URI, fingerprint, properties)."""
    base = (result.get("warm_start") or {})
    if not base.get("used"):
        return {}
    return {"base_model": [ArtifactRecord(
        "pushed_model", base["base_path"], base["base_fingerprint"],
        {"model": result["model_name"], "version": base["base_version"],
         "serving_root": base["serving_root"]})]}


def _import(model: str, inputs, out, env: StepEnv):
    from fer_pipeline.components.model_importer import run_model_importer
    return run_model_importer(inputs["keras_file"], inputs["transform"], out,
                              env.config.imports[model], model)


def _model_runs(inputs: Mapping[str, Any]) -> dict[str, str]:
    return {name[len("model_"):]: uri for name, uri in inputs.items()
            if name.startswith("model_")}


def _evaluate(inputs, out, env: StepEnv):
    from fer_pipeline.components.evaluator import run_evaluator
    return run_evaluator(inputs["examples"], _model_runs(inputs), env.serving_root, out,
                         env.config.evaluation)


def _infra_validate(inputs, out, env: StepEnv):
    from fer_pipeline.components.infra_validator import run_infra_validator
    return run_infra_validator(inputs["examples"], _model_runs(inputs), inputs["evaluation"],
                               out, env.config.infra_validation)


def _push(inputs, out, env: StepEnv):
    from fer_pipeline.components.pusher import run_pusher
    return run_pusher(_model_runs(inputs), inputs["evaluation"], inputs["infra_validation"],
                      env.serving_root, out, env.config.push)


def _blessings(output_uri: str, result: dict) -> list[ArtifactRecord]:
    """One blessing artifact per model: the gate's verdict and why."""
    blessings = fileio.read_json(fileio.join(output_uri, BLESSINGS_FILE))
    return [ArtifactRecord("blessing", f"{fileio.join(output_uri, BLESSINGS_FILE)}#{model}",
                           properties={"model": model, **verdict})
            for model, verdict in sorted(blessings.items())]


def _infra_blessings(output_uri: str, result: dict) -> list[ArtifactRecord]:
    """One infra blessing artifact per model: did it load and answer in a model server."""
    path = fileio.join(output_uri, INFRA_BLESSINGS_FILE)
    return [ArtifactRecord("infra_blessing", f"{path}#{model}",
                           properties={"model": model, "blessed": verdict["blessed"],
                                       "summary": verdict["summary"],
                                       "reasons": verdict["reasons"],
                                       "measurements": verdict["measurements"],
                                       "server": verdict["server"], "mode": verdict["mode"]})
            for model, verdict in sorted(fileio.read_json(path).items())]


def _pushed_versions(output_uri: str, result: dict) -> list[ArtifactRecord]:
    """One artifact per model version this push published."""
    records = []
    for model, push in sorted(result.get("models", {}).items()):
        if push.get("pushed"):
            records.append(ArtifactRecord(
                "pushed_model", push["path"], fingerprint(push["path"]),
                {"model": model, "version": push["version"],
                 "serving_root": result.get("serving_root", "")}))
    return records


# ----------------------------------------------------------------------------- parameters

def _section(name: str) -> Callable[[PipelineConfig, StepEnv], Any]:
    return lambda config, env: getattr(config, name)


def _ingest_parameters(config: PipelineConfig, env: StepEnv) -> Any:
    """The ingest section, plus the FER+ vote file's fingerprint: new votes under the same
    path are new labels, so ingest runs again."""
    if not config.ingest.ferplus_labels or not fileio.exists(config.ingest.ferplus_labels):
        return config.ingest
    return {"ingest": config.ingest,
            "ferplus_labels_fingerprint": fingerprint(config.ingest.ferplus_labels)}


def _train_parameters(model: str) -> Callable[[PipelineConfig, StepEnv], Any]:
    def parameters(config: PipelineConfig, env: StepEnv) -> Any:
        shared = {f.name: getattr(config.train, f.name)
                  for f in dataclasses.fields(config.train) if f.name != "models"}
        found = {"model": model, "model_config": config.train.models[model], **shared}
        if config.train.warm_start:
            # A new version in serving is a new starting point: the step runs again.
            from fer_pipeline.core.serving_root import latest_served_version
            served = latest_served_version(env.serving_root, model) if env.serving_root else None
            found["warm_start_from"] = served[1] if served else None
        return found
    return parameters


def _tune_parameters(model: str) -> Callable[[PipelineConfig, StepEnv], Any]:
    def parameters(config: PipelineConfig, env: StepEnv) -> Any:
        from fer_pipeline.core.config import registered_model
        from fer_pipeline.core.search_space import describe
        return {"model": model, "model_config": config.train.models[model],
                "tune": {f.name: getattr(config.tune, f.name)
                         for f in dataclasses.fields(config.tune) if f.name != "enabled"},
                "shuffle_buffer": config.train.shuffle_buffer,
                "search_space": describe(registered_model(model).search_space)}
    return parameters


def _import_parameters(model: str) -> Callable[[PipelineConfig, StepEnv], Any]:
    return lambda config, env: {"model": model, "import": config.imports[model]}


def _push_parameters(config: PipelineConfig, env: StepEnv) -> Any:
    return {"push": config.push, "serving_root": env.serving_root}


def _infra_validate_parameters(config: PipelineConfig, env: StepEnv) -> Any:
    # Which server binary validates matters: installing tensorflow_model_server re-runs it.
    # Imported here, where it is used; fer_pipeline.serving.server loads TensorFlow and gRPC
    # only when it serves, so declaring the DAG (fer-pipeline --help, the Kubeflow compiler)
    # stays light either way.
    from fer_pipeline.serving.server import tfserving_binary
    return {"infra_validation": config.infra_validation,
            "tfserving_binary": tfserving_binary(config.infra_validation.server) or ""}


def _evaluate_parameters(config: PipelineConfig, env: StepEnv) -> Any:
    # The serving root matters: the gate compares with the version served there.
    return {"evaluation": config.evaluation, "serving_root": env.serving_root}


def check_gate_labels(config: PipelineConfig, step_names: Sequence[str]) -> None:
    """ConfigError before any step runs when the evaluation would judge against FER+ votes
    that this run's ingest cannot produce (no ingest.ferplus_labels): better than finding
    out after training. When ingest ran earlier the evaluator checks its examples."""
    if (config.evaluation.gate_labels == "ferplus" and not config.ingest.ferplus_labels
            and {"ingest", "evaluate"} <= set(step_names)):
        raise ConfigError(
            "evaluation.gate_labels is ferplus but ingest.ferplus_labels is not set, so the "
            "test examples would carry no FER+ votes to judge against: give FER+'s "
            "fer2013new.csv (--ferplus-labels) or set evaluation.gate_labels: fer2013")


# ----------------------------------------------------------------------------- the DAG

def build_steps(models: Sequence[str] = MODEL_NAMES) -> list[Step]:
    """The pipeline's steps in a valid execution order, with one train step per model."""
    unknown = [m for m in models if m not in MODEL_NAMES and m not in IMPORTED_NAMES]
    if unknown:
        raise ConfigError(f"unknown models {unknown}; registered models: {list(MODEL_NAMES)}; "
                          f"names for imported models: {list(IMPORTED_NAMES)}")
    model_inputs = {f"model_{m}": f"{model_step(m)}.model_run" for m in models}
    steps = [
        Step("ingest", "examples", {"data": DATA}, {"examples": ""}, _ingest,
             _ingest_parameters, ("fer_pipeline.components.example_gen.executor",
                                  "fer_pipeline.components.example_gen.images",
                                  "fer_pipeline.components.example_gen.inputs",
                                  "fer_pipeline.components.example_gen.ferplus",
                                  "fer_pipeline.core.ferplus_votes"),
             "CSV or image folders -> split, quarantined, de-duplicated TFRecords", beam=True),
        Step("augment", "augmented", {"examples": "ingest.examples"}, {"augmented": ""},
             _augment, _section("augment"), ("fer_pipeline.components.augment",),
             "class-balancing augmentation of the training split", beam=True),
        Step("statistics", "statistics",
             {"examples": "ingest.examples", "augmented": "augment.augmented",
              "schema": SCHEMA},
             {"statistics": ""}, _statistics, _section("validation"),
             ("fer_pipeline.components.statistics.executor", "fer_pipeline.components.statistics.page_data",
              "fer_pipeline.components.statistics.ferplus"),
             "TFDV statistics per split + statistics.html", beam=True),
        Step("validate", "anomalies", {"statistics": "statistics.statistics", "schema": SCHEMA},
             {"anomalies": ""}, _validate, _section("validation"), ("fer_pipeline.components.validation",),
             "validate statistics against the schema; label drift"),
        Step("transform", "transform",
             # anomalies: only validated data is transformed (and KFP orders it so)
             {"augmented": "augment.augmented", "examples": "ingest.examples",
              "anomalies": "validate.anomalies"},
             {"transform": "", "transform_graph": TRANSFORM_GRAPH_DIR,
              "transformed": TRANSFORMED_DIR}, _transform,
             _section("transform"), ("fer_pipeline.components.transform",),
             "tensorflow-transform normalization", beam=True),
    ]
    for model in models:
        if model in IMPORTED_NAMES:
            # A Keras file trained elsewhere, wrapped into the layout a train step writes.
            steps.append(Step(
                model_step(model), f"imported/{model}",
                {"keras_file": KERAS_FILE + model, "transform": "transform.transform"},
                {"model_run": "", "serving_model": SERVING_MODEL_DIR},
                functools.partial(_import, model), _import_parameters(model),
                ("fer_pipeline.components.model_importer", "fer_pipeline.core.serving_export",
                 "fer_pipeline.core.calibration"),
                f"import the {model} model from a Keras file", model=model))
            continue
        steps.append(Step(
            f"tune-{model}", f"tuning/{model}", {"transform": "transform.transform"},
            {"tuning": ""}, functools.partial(_tune, model), _tune_parameters(model),
            tuple(f"fer_pipeline.components.tuner.{module}" for module in
                  ("executor", "search", "distributed", "worker"))
            + ("fer_pipeline.components.trainer.models", "fer_pipeline.core.training_data",
               "fer_pipeline.core.search_space"),
            f"search the {model} model's hyperparameters (off unless asked: --tune)",
            model=model, enabled=lambda config: config.tune.enabled))
        steps.append(Step(
            f"train-{model}", f"models/{model}",
            {"transform": "transform.transform", "tuning": f"tune-{model}.tuning"},
            {"model_run": "", "serving_model": SERVING_MODEL_DIR},
            functools.partial(_train, model), _train_parameters(model),
            tuple(f"fer_pipeline.components.trainer.{module}" for module in
                  ("executor", "distribution", "models", "warm_start"))
            + ("fer_pipeline.core.training_data", "fer_pipeline.core.serving_export",
               "fer_pipeline.core.search_space", "fer_pipeline.core.calibration"),
            f"train the {model} model", resumable=True, model=model,
            optional_inputs=("tuning",), result_inputs=_base_model))
    steps += [
        Step("evaluate", "evaluation", {"examples": "ingest.examples", **model_inputs},
             {"evaluation": ""}, _evaluate, _evaluate_parameters,
             tuple(f"fer_pipeline.components.evaluator.{module}" for module in
                   ("executor", "split", "predictions", "metrics", "ensemble", "ferplus", "gate"))
             + ("fer_pipeline.core.ensemble", "fer_pipeline.core.calibration",
                "fer_pipeline.core.ferplus_votes"),
             "test-split evaluation and the blessing gate", derived=_blessings),
        Step("infra-validate", "infra_validation",
             {"examples": "ingest.examples", "evaluation": "evaluate.evaluation",
              **model_inputs},
             {"infra_validation": ""}, _infra_validate, _infra_validate_parameters,
             ("fer_pipeline.components.infra_validator", "fer_pipeline.serving.warmup",
              "fer_pipeline.core.report_page"),
             "blessed candidates served by a sandboxed model server and queried",
             derived=_infra_blessings),
        Step("push", "push",
             {"evaluation": "evaluate.evaluation",
              "infra_validation": "infra-validate.infra_validation", **model_inputs},
             {"push": ""}, _push, _push_parameters, ("fer_pipeline.components.pusher",),
             "push models blessed by evaluation and infra validation to the serving "
             "directory", derived=_pushed_versions),
    ]
    _check_order(steps)
    return steps


def model_step(model: str) -> str:
    """The step that produces `model`'s candidate: train-<model>, or import-<model>."""
    return f"import-{model}" if model in IMPORTED_NAMES else f"train-{model}"


def _check_order(steps: list[Step]) -> None:
    """Every input refers to an earlier step's declared output (the list is topological)."""
    seen: dict[str, Step] = {}
    for step in steps:
        for input_name, ref in step.inputs.items():
            producer, output = ref.split(".", 1)
            if producer == PIPELINE_INPUT:
                continue
            if producer not in seen or output not in seen[producer].outputs:
                raise ValueError(f"step {step.name!r} input {input_name!r} refers to "
                                 f"{ref!r}, which no earlier step declares")
        seen[step.name] = step


STEP_NAMES: tuple[str, ...] = tuple(step.name for step in build_steps())


def step_by_name(name: str, models: Sequence[str] = MODEL_NAMES) -> Step:
    for step in build_steps(models):
        if step.name == name:
            return step
    raise ConfigError(f"unknown step {name!r}; steps are {list(STEP_NAMES)}")


def code_fingerprint(modules: Sequence[str]) -> str:
    """sha256 over the source of the modules a step runs: editing them re-runs the step."""
    digest = hashlib.sha256()
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ValueError(f"cannot find the source of module {module!r}")
        with open(spec.origin, "rb") as f:
            digest.update(module.encode() + b"\0" + f.read() + b"\0")
    return "sha256:" + digest.hexdigest()


def mermaid(steps: Sequence[Step]) -> str:
    """The DAG as a Mermaid flowchart (docs/architecture.md embeds it)."""
    lines = ["flowchart TD", "    data[(CSV data)]", "    schema[(checked-in schema)]"]
    for step in steps:
        outputs = ", ".join(step.outputs)
        lines.append(f'    {_node(step.name)}["{step.name}<br/><small>{step.directory}/ : '
                     f'{outputs}</small>"]')
    for step in steps:
        for name, ref in step.inputs.items():
            producer, output = ref.split(".", 1)
            source = output if producer == PIPELINE_INPUT else _node(producer)
            label = "" if producer == PIPELINE_INPUT else f"|{output}|"
            arrow = "-.->" if name in step.optional_inputs else "-->"   # used when present
            lines.append(f"    {source} {arrow}{label} {_node(step.name)}")
    return "\n".join(lines) + "\n"


def _node(name: str) -> str:
    return name.replace("-", "_")
