"""Runs the pipeline's steps in order over one run root.

Each step reads only the directories of earlier steps and writes only its own, so any step
can also run alone (`fer-pipeline <step> --output RUN_ROOT`), which is what an orchestrator
such as Airflow or Kubeflow needs. `pipeline.artifacts.run_step` makes every step skip when
its inputs and parameters are unchanged, and makes a crashed step leave nothing that looks
finished.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipeline.artifacts import StepOutcome, run_step
from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("cnn", "vgg16")
# Relative paths in the config (the checked-in schema) are looked up here when they do not
# exist relative to the working directory, so the CLI works from any directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunContext:
    data_path: Optional[str]
    run_root: str
    config: PipelineConfig
    beam_args: list[str] = field(default_factory=list)
    force: bool = False
    models: tuple[str, ...] = MODEL_NAMES

    def dir(self, step_dir: str) -> str:
        return os.path.join(self.run_root, step_dir)

    @property
    def serving_root(self) -> str:
        return os.path.abspath(self.config.push.serving_root or self.dir("serving_models"))

    @property
    def schema_path(self) -> str:
        path = self.config.validation.schema_path
        if not os.path.isabs(path) and not os.path.exists(path):
            return str(PROJECT_ROOT / path)
        return path


class PipelineError(RuntimeError):
    """A step refused to go on (bad data, anomalies); the message says why and what to do."""


def _require(path: str, produced_by: str) -> str:
    if not os.path.exists(path):
        raise PipelineError(f"{path} does not exist: run the `{produced_by}` step first "
                            f"(or `fer-pipeline run`)")
    return path


def step_ingest(ctx: RunContext) -> StepOutcome:
    from components.example_gen import run_example_gen

    if not ctx.data_path:
        raise PipelineError("ingest needs --data PATH (a FER-2013 format CSV)")
    data = _require(ctx.data_path, "synth")
    return run_step(
        "ingest", ctx.dir("examples"), {"data": data}, ctx.config.ingest,
        lambda out: run_example_gen(data, out, ctx.config.ingest, ctx.beam_args), ctx.force)


def step_statistics(ctx: RunContext) -> StepOutcome:
    from components.statistics import run_statistics

    examples = _require(ctx.dir("examples"), "ingest")
    return run_step(
        "statistics", ctx.dir("statistics"), {"examples": examples}, {},
        lambda out: run_statistics(examples, out, ctx.beam_args), ctx.force)


def step_validate(ctx: RunContext) -> StepOutcome:
    from components.validation import run_validation

    statistics = _require(ctx.dir("statistics"), "statistics")
    schema = _require(ctx.schema_path, "validate (checked-in schema)")
    outcome = run_step(
        "validate", ctx.dir("anomalies"), {"statistics": statistics, "schema": schema},
        ctx.config.validation,
        lambda out: run_validation(statistics, schema, out, ctx.config.validation), ctx.force)
    result = outcome.manifest["result"]
    # Raised after the step is recorded, so the report sits in anomalies/ for the user.
    if result.get("blocking"):
        report = os.path.join(outcome.step_dir, "report.txt")
        text = Path(report).read_text() if os.path.exists(report) else result.get("summary", "")
        raise PipelineError(
            f"data validation found anomalies; the run stops here.\n{text}\n"
            f"Full report: {report}. If this data is expected, re-run with --allow-anomalies.")
    return outcome


def step_augment(ctx: RunContext) -> StepOutcome:
    from components.augment import run_augment

    examples = _require(ctx.dir("examples"), "ingest")
    return run_step(
        "augment", ctx.dir("augmented"), {"train": os.path.join(examples, "train")},
        ctx.config.augment,
        lambda out: run_augment(examples, out, ctx.config.augment, ctx.beam_args), ctx.force)


def step_transform(ctx: RunContext) -> StepOutcome:
    from components.transform import run_transform

    augmented = _require(ctx.dir("augmented"), "augment")
    examples = _require(ctx.dir("examples"), "ingest")
    inputs = {"augmented_train": os.path.join(augmented, "train"),
              "validation": os.path.join(examples, "validation"),
              "test": os.path.join(examples, "test"),
              "preprocessing_code": os.path.join(os.path.dirname(__file__), "..",
                                                 "components", "transform.py")}
    return run_step(
        "transform", ctx.dir("transform"), inputs, ctx.config.transform,
        lambda out: run_transform(augmented, examples, out, ctx.config.transform,
                                  ctx.beam_args), ctx.force)


def step_train(ctx: RunContext, model_name: str) -> StepOutcome:
    from components.trainer import run_trainer

    transform = _require(ctx.dir("transform"), "transform")
    model_config = getattr(ctx.config.train, model_name)
    params = {"model": model_name, "model_config": model_config,
              **{k: v for k, v in dataclasses.asdict(ctx.config.train).items()
                 if k not in MODEL_NAMES}}
    return run_step(
        f"train-{model_name}", ctx.dir(f"models/{model_name}"), {"transform": transform},
        params, lambda out: run_trainer(model_name, transform, out, ctx.config.train),
        ctx.force, resumable=True)


def _trained_models(ctx: RunContext) -> tuple[dict[str, str], dict[str, str]]:
    """Each model's step directory, and its exported SavedModel as a fingerprinted input."""
    model_dirs = {m: _require(ctx.dir(f"models/{m}"), f"train --model {m}") for m in ctx.models}
    inputs = {f"model_{m}": os.path.join(d, "serving_model") for m, d in model_dirs.items()}
    return model_dirs, inputs


def step_evaluate(ctx: RunContext) -> StepOutcome:
    from components.evaluator import run_evaluator

    examples = _require(ctx.dir("examples"), "ingest")
    model_dirs, model_inputs = _trained_models(ctx)
    inputs = {"test": os.path.join(examples, "test"), **model_inputs}
    return run_step(
        "evaluate", ctx.dir("evaluation"), inputs, ctx.config.evaluation,
        lambda out: run_evaluator(examples, model_dirs, ctx.serving_root, out,
                                  ctx.config.evaluation), ctx.force)


def step_push(ctx: RunContext) -> StepOutcome:
    from components.pusher import run_pusher

    evaluation = _require(ctx.dir("evaluation"), "evaluate")
    model_dirs, model_inputs = _trained_models(ctx)
    inputs = {"evaluation": evaluation, **model_inputs}
    params = {"push": ctx.config.push, "serving_root": ctx.serving_root}
    return run_step(
        "push", ctx.dir("push"), inputs, params,
        lambda out: run_pusher(model_dirs, evaluation, ctx.serving_root, out, ctx.config.push),
        ctx.force)


def _train_steps() -> list[tuple[str, Callable[[RunContext], StepOutcome]]]:
    return [(f"train-{m}", lambda ctx, m=m: step_train(ctx, m)) for m in MODEL_NAMES]


# The whole pipeline, in order. Names are what `--steps` accepts.
STEPS: list[tuple[str, Callable[[RunContext], StepOutcome]]] = [
    ("ingest", step_ingest),
    ("statistics", step_statistics),
    ("validate", step_validate),
    ("augment", step_augment),
    ("transform", step_transform),
    *_train_steps(),
    ("evaluate", step_evaluate),
    ("push", step_push),
]
STEP_NAMES: tuple[str, ...] = tuple(name for name, _ in STEPS)


def run_pipeline(ctx: RunContext, steps: Optional[list[str]] = None) -> list[StepOutcome]:
    """Runs `steps` (default: all) in pipeline order and returns what each did."""
    wanted = set(steps or STEP_NAMES)
    unknown = wanted - set(STEP_NAMES)
    if unknown:
        raise PipelineError(f"unknown steps {sorted(unknown)}; steps are {list(STEP_NAMES)}")
    wanted -= {f"train-{m}" for m in MODEL_NAMES if m not in ctx.models}
    outcomes = []
    for name, step in STEPS:
        if name not in wanted:
            continue
        outcome = step(ctx)
        verb = "skipped (unchanged)" if outcome.skipped else (
            f"done in {outcome.manifest.get('duration_s', 0):.1f}s")
        log.info("%-12s %s -> %s", name, verb, outcome.step_dir)
        print(f"[fer-pipeline] {name:<12} {verb:<22} {outcome.step_dir}", flush=True)
        outcomes.append(outcome)
    return outcomes
