"""`fer-pipeline`: run the whole pipeline, or one step, from the command line.

Commands that run Beam (`run`, `compile`, `infer` and the Beam steps: ingest, augment,
statistics, transform) pass Beam pipeline options through untouched, e.g.
`--runner=DataflowRunner --project=...` or
`--direct_running_mode=multi_processing --direct_num_workers=2`; a flag that neither this
CLI nor Beam knows is refused, on every command. Each command's `--help` lists only the
flags it takes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional

from fer_pipeline.core import tf_cpu
from fer_pipeline.core.config import MODEL_NAMES, PipelineConfig, load_config
from fer_pipeline.pipeline.dag import DATA, SCHEMA, STEP_NAMES, Step, build_steps
from fer_pipeline.core.errors import EXIT_USAGE, UserError, exit_process, is_user_error, run_cli

TRAIN_COMMAND = "train"
INFER_COMMAND = "infer"
MONITOR_COMMAND = "monitor"
EXIT_DRIFT = 1         # `monitor`: a drift threshold was crossed (a scheduler retrains)

# Before any step imports TensorFlow (none is imported above): the reason is in the module.
tf_cpu.prefer_onednn()


def step_commands() -> list[tuple[str, list[str], str]]:
    """(command, the steps it runs, help) for every step of the declared pipeline.

    Per-model steps share one command (`train --model NAME`).
    """
    commands: list[tuple[str, list[str], str]] = []
    for step in build_steps():
        if step.model is not None:
            if not any(name == TRAIN_COMMAND for name, _, _ in commands):
                commands.append((TRAIN_COMMAND, [], "train one model (--model) or all "
                                 "(models/<name>/)"))
            commands[-1][1].append(step.name)
        else:
            commands.append((step.name, [step.name],
                             f"{step.description} ({step.directory}/)"))
    return commands


STEP_COMMANDS = step_commands()


BEAM_EPILOG = ("Beam pipeline options go to Beam untouched, e.g. --runner=DataflowRunner "
               "--project=P, or --direct_running_mode=multi_processing "
               "--direct_num_workers=2; any other unknown flag is refused.")


def _steps_of(command: str) -> list[Step]:
    steps = build_steps()
    if command == "run":
        return steps
    names = next(names for name, names, _ in STEP_COMMANDS if name == command)
    return [step for step in steps if step.name in names]


def takes_beam_options(command: str) -> bool:
    """Whether `command` runs Beam, and so passes Beam's pipeline options on."""
    if command in ("compile", INFER_COMMAND):
        return True
    if command == "run" or any(name == command for name, _, _ in STEP_COMMANDS):
        return any(step.beam for step in _steps_of(command))
    return False


def _add_step_flags(parser: argparse.ArgumentParser, steps: list[Step]) -> None:
    """The flags of a command that runs `steps`: each flag only where a step uses it."""
    parser.add_argument("--output", required=True,
                        help="run root (local directory or gs:// / s3:// URI)")
    if any(DATA in step.inputs.values() for step in steps):
        parser.add_argument("--data", required=True, action="append",
                            help="FER-2013 format CSV; repeat to train on several "
                                 "(e.g. the original data plus reviewed faces)")
    parser.add_argument("--config", help="YAML or JSON file overriding core/config.py")
    parser.add_argument("--profile", default="default", choices=["default", "smoke"],
                        help="'smoke' shrinks training for tests and demos")
    parser.add_argument("--force", action="store_true",
                        help="re-run steps even when inputs, parameters and code are unchanged")
    if any(SCHEMA in step.inputs.values() for step in steps):
        parser.add_argument("--allow-anomalies", action="store_true",
                            help="go on when data validation finds anomalies (still reported)")
    if any(step.model is not None for step in steps):
        parser.add_argument("--vgg-weights",
                            help="'none' (random init, default), 'imagenet' (downloads), "
                                 "or a .h5")
    if any(name.startswith("model_") for step in steps for name in step.inputs):
        parser.add_argument("--serving-root", help="where blessed models are pushed "
                            "(default: <output>/serving_models)")
    if any(step.name == "push" for step in steps):
        parser.add_argument("--request-log-dir", metavar="DIR",
                            help="fer-serve logs the pushed models' requests under "
                                 "DIR/<model>/ (models.config's logging_config)")
        parser.add_argument("--request-log-sampling-rate", type=float, metavar="R",
                            help="share of requests logged, 0 to 1 (default 1)")
    parser.add_argument("--metadata-db", help="ML Metadata SQLite file "
                        "(default: <output>/metadata.sqlite)")
    parser.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-pipeline", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic FER-2013 format CSV",
                                description="Procedurally drawn faces in FER-2013's format, "
                                "class and Usage proportions; deterministic by seed.")
    synth.add_argument("--rows", type=int, default=35887)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-usage", action="store_true", help="omit the Usage column")

    run = commands.add_parser("run", help="run the whole pipeline (or --steps)",
                              description="CSV to pushed models.", epilog=BEAM_EPILOG)
    _add_step_flags(run, _steps_of("run"))
    run.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    run.add_argument("--models", default=",".join(MODEL_NAMES),
                     help="which registered models to train/evaluate/push")

    for name, _, help_text in STEP_COMMANDS:
        step = commands.add_parser(name, help=help_text, description=help_text,
                                   epilog=BEAM_EPILOG if takes_beam_options(name) else None)
        _add_step_flags(step, _steps_of(name))
        if name == TRAIN_COMMAND:
            step.add_argument("--model", choices=MODEL_NAMES,
                              help="train only this model (default: all)")
        if name in ("evaluate", "push"):
            step.add_argument("--models", default=",".join(MODEL_NAMES),
                              help=f"which registered models to {name} (comma-separated)")

    lineage = commands.add_parser(
        "lineage", help="where a served model version came from (ML Metadata)",
        description="For a pushed model version: the data file and its fingerprint, rejected "
        "rows, statistics and anomalies verdict, transform, training run, evaluation "
        "metrics and the blessing that let it through.")
    lineage.add_argument("--output", required=True, help="run root")
    lineage.add_argument("--model", choices=MODEL_NAMES, help="default: every model")
    lineage.add_argument("--version", type=int, help="default: the latest pushed version")
    lineage.add_argument("--metadata-db", help="ML Metadata SQLite file")
    lineage.add_argument("--config", help="YAML/JSON config (for a MySQL metadata store)")
    lineage.add_argument("--json", action="store_true", help="print JSON instead of text")

    compile_ = commands.add_parser(
        "compile", help="write the Kubeflow Pipelines v2 definition",
        description="Compiles the declared pipeline to KFP v2 YAML; Beam options given here "
        "are baked into the data steps (e.g. --runner=DataflowRunner ...).",
        epilog=BEAM_EPILOG)
    compile_.add_argument("--kfp", required=True, metavar="PIPELINE_YAML")
    compile_.add_argument("--models", default=",".join(MODEL_NAMES),
                          help="which registered models the pipeline trains (comma-separated)")
    compile_.add_argument("--image", default="fer-pipeline:latest",
                          help="container image the components run in (see Dockerfile)")
    compile_.add_argument("--bulk-inference", action="store_true",
                          help="write the bulk-inference pipeline (`fer-pipeline infer` as "
                               "one component) instead of the training pipeline")
    compile_.add_argument("--monitor", action="store_true",
                          help="write the monitoring pipeline (`fer-pipeline monitor` as one "
                               "component) instead of the training pipeline")

    infer = commands.add_parser(
        INFER_COMMAND, help="score a CSV or a directory of photos with the served models "
        "(Beam)", epilog=BEAM_EPILOG,
        description="Bulk inference on Beam: every face of a FER-2013 CSV (any Usage, label "
        "optional) or of the photos in a directory (faces found with OpenCV) is scored by "
        "each model and combined by the ensemble rule; writes predictions.csv, rejected.csv, "
        "PredictionLog TFRecords and inference.json into --output.")
    infer.add_argument("--data", required=True, help="FER-2013 format CSV, or a directory "
                       "of images (local, gs:// or s3://)")
    infer.add_argument("--output", required=True, help="directory the predictions go to")
    infer.add_argument("--serving-root", required=True,
                       help="the pushed models (e.g. RUN/serving_models): its models.config "
                            "says which versions are served")
    infer.add_argument("--models", default=",".join(MODEL_NAMES),
                       help="comma-separated; NAME runs the served version, NAME:VERSION "
                            "that version (default: %(default)s)")
    infer.add_argument("--review-queue", metavar="DIR",
                       help="queue the faces that need a person for fer-review in DIR")
    infer.add_argument("--config", help="YAML or JSON file overriding core/config.py "
                       "(inference batch sizes, evaluation.tie_tolerance)")
    infer.add_argument("--metadata-db", help="ML Metadata SQLite file "
                       "(default: <output>/metadata.sqlite)")
    infer.add_argument("-v", "--verbose", action="store_true")

    monitor = commands.add_parser(
        MONITOR_COMMAND, help="served traffic (request logs) against the training run of "
        "the served versions: drift, class mix, confidence, review rate",
        description="Reads TF Serving request logs (PredictionLog TFRecords) for a window and "
        "compares the served faces and answers with the run that produced the served "
        "versions (found through lineage in ML Metadata); writes monitoring.json, the TFDV "
        "anomalies and monitoring.html. Exits 1, with one line saying why, when a threshold "
        "(config section 'monitor') is crossed.")
    monitor.add_argument("--output", required=True,
                         help="run root whose ML Metadata recorded the push of the served "
                              "versions")
    monitor.add_argument("--logs", action="append", default=[], metavar="PATH",
                         help="request log file or directory (repeatable; default: the "
                              "logging_config directories in the serving root's "
                              "models.config)")
    monitor.add_argument("--since", help="window start: ISO 8601 (UTC unless given) or a "
                                         "duration ago, e.g. 2h")
    monitor.add_argument("--until", help="window end (exclusive), same forms")
    monitor.add_argument("--out", help="where monitoring.json/.html go "
                         "(default: <output>/monitoring/<UTC time>)")
    monitor.add_argument("--review-queue", metavar="DIR",
                         help="queue the window's tied and least confident faces for "
                              "fer-review in DIR")
    monitor.add_argument("--min-requests", type=int, metavar="N",
                         help="judge windows of at least N faces (default: the config's "
                              "monitor.min_requests)")
    monitor.add_argument("--serving-root", help="default: <output>/serving_models")
    monitor.add_argument("--config", help="YAML or JSON file overriding core/config.py "
                         "(section 'monitor': the thresholds)")
    monitor.add_argument("--metadata-db", help="ML Metadata SQLite file "
                         "(default: <output>/metadata.sqlite)")
    monitor.add_argument("-v", "--verbose", action="store_true")

    dag = commands.add_parser("dag", help="print the declared pipeline",
                              description="Steps, inputs and outputs; --mermaid for a diagram.")
    dag.add_argument("--mermaid", action="store_true")

    path = commands.add_parser("path", help="print the committed URI of a step's output",
                               description="e.g. `fer-pipeline path --output RUN evaluate`")
    path.add_argument("--output", required=True)
    path.add_argument("ref", help="STEP or STEP.OUTPUT, e.g. train-cnn.serving_model")
    return parser


def _config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides: dict = {}
    if getattr(args, "allow_anomalies", False):
        overrides.setdefault("validation", {})["allow_anomalies"] = True
    if getattr(args, "vgg_weights", None):
        overrides.setdefault("train", {})["models"] = {"vgg16": {"weights": args.vgg_weights}}
    if getattr(args, "serving_root", None):
        overrides.setdefault("push", {})["serving_root"] = args.serving_root
    if getattr(args, "request_log_dir", None):
        overrides.setdefault("push", {})["request_log_dir"] = args.request_log_dir
    if getattr(args, "request_log_sampling_rate", None) is not None:
        overrides.setdefault("push", {})["request_log_sampling_rate"] = \
            args.request_log_sampling_rate
    if getattr(args, "metadata_db", None):
        overrides.setdefault("metadata", {})["sqlite_path"] = args.metadata_db
    return load_config(getattr(args, "config", None), profile=getattr(args, "profile", "default"),
                       overrides=overrides)


def _steps_for(args: argparse.Namespace) -> Optional[list[str]]:
    if args.command == "run":
        return args.steps.split(",") if args.steps else None
    if args.command == TRAIN_COMMAND:
        return [f"train-{m}" for m in ([args.model] if args.model else MODEL_NAMES)]
    return next(steps for name, steps, _ in STEP_COMMANDS if name == args.command)


def _models(args: argparse.Namespace) -> tuple[str, ...]:
    if args.command == TRAIN_COMMAND and args.model:
        return (args.model,)
    return tuple(getattr(args, "models", ",".join(MODEL_NAMES)).split(","))


def _run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from fer_pipeline.pipeline.runner import RunContext, run_pipeline

    ctx = RunContext(data_paths=getattr(args, "data", None) or [], run_root=args.output,
                     config=_config_from_args(args), beam_args=beam_args, force=args.force,
                     models=_models(args))
    outcomes = {o.step: o for o in run_pipeline(ctx, _steps_for(args))}
    if "push" in outcomes:
        gate, infra = _summaries(outcomes, "evaluate"), _summaries(outcomes, "infra-validate")
        for model, push in sorted(outcomes["push"].manifest["result"].get("models", {}).items()):
            for line in _closing_lines(model, push, gate.get(model), infra.get(model)):
                print(f"[fer-pipeline] {line}", flush=True)
    return 0


def _summaries(outcomes: dict, step: str) -> dict[str, str]:
    """A step's one-line verdict per model, when the step was part of this run."""
    return (outcomes[step].manifest["result"].get("summaries") or {}) if step in outcomes else {}


def _closing_lines(model: str, push: dict, gate_summary: Optional[str],
                   infra_summary: Optional[str]) -> list[str]:
    """Per model: the infra verdict, then the version it was pushed as; or one line saying
    which gate held it back and why."""
    reasons = push.get("reasons", [])
    if reasons[:1] == ["not infra-blessed"]:
        return [infra_summary or f"{model} held back by infra validation: "
                + "; ".join(reasons[1:2])]
    if reasons[:1] == ["not blessed"]:
        return [_push_line(model, push, gate_summary)]
    return ([infra_summary] if infra_summary else []) + [_push_line(model, push, gate_summary)]


def _push_line(model: str, push: dict, summary: Optional[str]) -> str:
    """One line per model: the version it was pushed as, or why it was held back."""
    if push.get("pushed"):
        return f"{model}: pushed as version {push['version']}"
    reasons = [r for r in push.get("reasons", []) if r != "not blessed"]
    if reasons and reasons[0].startswith("identical to served version"):
        return f"{model}: not pushed again, {reasons[0]}"
    return summary or f"{model} held back: " + "; ".join(reasons[:3])


def _lineage(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.lineage import format_lineage, model_lineage

    config = _config_from_args(args)
    found = model_lineage(args.output, config.metadata, args.model, args.version)
    if args.json:
        import json
        print(json.dumps(found, indent=2, sort_keys=True))
    else:
        print(format_lineage(found))
    return 0


def _compile(args: argparse.Namespace, beam_args: list[str]) -> int:
    from fer_pipeline.pipeline.kfp_pipeline import compile_inference_pipeline, compile_pipeline

    directory = os.path.dirname(os.path.abspath(args.kfp))
    if not os.path.isdir(directory):
        raise UserError(f"compile: cannot write {args.kfp}: directory {directory} does not "
                        "exist")
    if args.monitor:
        from fer_pipeline.pipeline.kfp_pipeline import compile_monitor_pipeline

        path = compile_monitor_pipeline(args.kfp, image=args.image)
        print(f"[fer-pipeline] wrote the Kubeflow monitoring pipeline to {path}")
        return 0
    if args.bulk_inference:
        path = compile_inference_pipeline(args.kfp, beam_args=beam_args, image=args.image)
        print(f"[fer-pipeline] wrote the Kubeflow bulk-inference pipeline to {path}")
        return 0
    path = compile_pipeline(args.kfp, models=tuple(args.models.split(",")),
                            beam_args=beam_args, image=args.image)
    print(f"[fer-pipeline] wrote the Kubeflow pipeline to {path}")
    return 0


def _infer(args: argparse.Namespace, beam_args: list[str]) -> int:
    import dataclasses

    from fer_pipeline.core import fileio
    from fer_pipeline.pipeline.infer_command import run_inference_job

    config = load_config(args.config)
    result = run_inference_job(
        fileio.absolute(args.data), fileio.absolute(args.output),
        fileio.absolute(args.serving_root), [m for m in args.models.split(",") if m],
        config, beam_args, review_queue=args.review_queue,
        metadata=dataclasses.replace(config.metadata, sqlite_path=args.metadata_db)
        if args.metadata_db else config.metadata)
    versions = ", ".join(f"{name} v{m['version']}" for name, m in result.models.items())
    print(f"[fer-pipeline] infer: {result.faces_scored} face(s) scored by {versions} in "
          f"{result.seconds:.1f}s; {result.needs_review} need human review; "
          f"{result.rejected} rejected", flush=True)
    print(f"[fer-pipeline] predictions: {result.predictions_path}")
    if result.rejected:
        reasons = ", ".join(f"{code} {n}" for code, n in result.rejected_by_reason.items())
        print(f"[fer-pipeline] rejected ({reasons}): {result.rejected_path}")
    if result.review_queue:
        queue = result.review_queue
        for note in queue["notes"]:
            print(f"[fer-pipeline] review queue: {note}")
        print(f"[fer-pipeline] review queue: {queue['queued']} face(s) queued in "
              f"{queue['queue']}, {queue['already_queued']} already there")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    import dataclasses

    from fer_pipeline.core import fileio
    from fer_pipeline.pipeline.monitor_command import default_output, parse_moment, run_monitor_job

    config = _config_from_args(args)
    if args.min_requests is not None:
        if args.min_requests < 1:
            raise UserError(f"monitor: --min-requests must be at least 1, got "
                            f"{args.min_requests}")
        config = dataclasses.replace(config, monitor=dataclasses.replace(
            config.monitor, min_requests=args.min_requests))
    since = parse_moment(args.since) if args.since else None
    until = parse_moment(args.until) if args.until else None
    if since and until and since >= until:
        raise UserError(f"monitor: --since {args.since} is not before --until {args.until}")
    output = fileio.absolute(args.out or default_output(args.output))
    result = run_monitor_job(args.output, args.logs, output, config, since, until,
                             args.review_queue, serving_root=args.serving_root or "")
    print(f"[fer-pipeline] monitor: {result.summary}", flush=True)
    if args.review_queue:
        print(f"[fer-pipeline] review queue: {result.review_queued} face(s) queued in "
              f"{args.review_queue}")
    print(f"[fer-pipeline] monitoring page: {result.html_path}")
    return EXIT_DRIFT if result.verdict == "drift" else 0


def _dag(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.dag import mermaid

    steps = build_steps()
    if args.mermaid:
        print(mermaid(steps), end="")
        return 0
    for step in steps:
        inputs = ", ".join(f"{k}<-{v}" for k, v in step.inputs.items())
        print(f"{step.name:<12} {step.directory + '/':<14} in: {inputs}")
        print(f"{'':<12} {'':<14} out: {', '.join(step.outputs)}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.runner import committed_output

    print(committed_output(args.output, args.ref))
    return 0


def unknown_beam_options(beam_args: list[str]) -> list[str]:
    """The arguments among `beam_args` that no Beam pipeline option takes.

    Beam itself only logs "Discarding unparseable args" for those and runs on, so a typo
    would be silently ignored; we parse with Beam's own option classes and refuse them.
    """
    from apache_beam.options import pipeline_options as beam_options

    from fer_pipeline.core import beam_job  # noqa: F401 - declares the job-server options we pass on

    class BeamOptionParser(beam_options._BeamArgumentParser):  # Beam's (ValueProviders)
        def error(self, message: str):   # argparse would print Beam's whole usage
            raise UserError(f"Beam option: {message}")

    parser = BeamOptionParser()
    classes = {str(cls): cls for cls in beam_options.PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(beam_args)
    return unknown


def _parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    """Our arguments and the Beam options; a flag nobody takes is a usage error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args, []
    if takes_beam_options(args.command):
        unknown = unknown_beam_options(extra)
        if unknown:
            raise UserError(f"{args.command}: unrecognized argument(s) {' '.join(unknown)}: "
                            f"neither `fer-pipeline {args.command}` nor Beam takes them "
                            f"(see `fer-pipeline {args.command} --help`)")
        return args, extra
    raise UserError(f"{args.command}: unrecognized argument(s) {' '.join(extra)} (see "
                    f"`fer-pipeline {args.command} --help`; Beam options are taken only by "
                    f"run, compile, infer and the Beam steps)")


def _main(argv: Optional[list[str]] = None) -> int:
    from fer_pipeline.pipeline.runner import PipelineError

    try:
        args, beam_args = _parse(argv)
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        handlers = {"synth": lambda: _synth(args), "lineage": lambda: _lineage(args),
                    "compile": lambda: _compile(args, beam_args), "dag": lambda: _dag(args),
                    INFER_COMMAND: lambda: _infer(args, beam_args),
                    MONITOR_COMMAND: lambda: _monitor(args),
                    "path": lambda: _path(args)}
        return handlers.get(args.command, lambda: _run(args, beam_args))()
    except (UserError, PipelineError, ValueError, OSError) as error:
        # Bad arguments, bad config, bad data (too many rejected rows), missing inputs, a
        # file that cannot be written: say it in our words, no trace. Anything else, and
        # a ValueError raised inside a library, is our bug: run_cli says where its trace is.
        if not (isinstance(error, PipelineError) or is_user_error(error)):
            raise
        print(f"[fer-pipeline] error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _synth(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.synthetic import generate_csv

    if args.rows < 1:
        raise UserError(f"synth: --rows must be at least 1, got {args.rows}")
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise UserError(f"synth: cannot write {args.out}: directory {directory} does not exist")
    result = generate_csv(args.out, rows=args.rows, seed=args.seed,
                          include_usage=not args.no_usage)
    classes = ", ".join(f"{name} {count}" for name, count in result.label_counts.items())
    splits = ", ".join(f"{usage} {count}" for usage, count in result.usage_counts.items())
    print(f"[fer-pipeline] wrote {result.rows} synthetic faces (seed {result.seed}) to "
          f"{result.path} in {result.seconds:.1f} s: {classes}" + (f"; {splits}" if splits else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The CLI: a user's mistake ends in one `error:` line, a bug in one line saying where
    its traceback is (core/errors.py)."""
    return run_cli("fer-pipeline", _main, argv)


def entry_point() -> NoReturn:
    """The `fer-pipeline` console script (fer_pipeline.core.errors.exit_process says why it ends so)."""
    exit_process(main())


if __name__ == "__main__":
    entry_point()
