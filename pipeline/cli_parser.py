"""The `fer-pipeline` command line: its commands and their flags, built from the declared
pipeline (pipeline/dag.py) so a new step gets its command without editing this file, and
the split of a command line into our arguments and the Beam options passed on untouched.
"""
from __future__ import annotations

import argparse
from typing import Optional

from fer_pipeline.core.config import IMPORTED_MODELS, IMPORTED_NAMES, MODEL_NAMES
from fer_pipeline.core.credentials import redact_beam_args
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.pipeline.dag import DATA, SCHEMA, STEP_NAMES, Step, build_steps

__all__ = ["BEAM_EPILOG", "IMPORT_COMMAND", "INFER_COMMAND", "MONITOR_COMMAND", "STEP_COMMANDS", "TRAIN_COMMAND",
           "TUNE_COMMAND",
           "build_parser", "parse_command_line", "step_commands", "takes_beam_options",
           "unknown_beam_options"]

TRAIN_COMMAND = "train"
TUNE_COMMAND = "tune"
# The commands of per-model steps (tune-cnn, train-cnn... are `tune`/`train --model cnn`).
PER_MODEL_HELP = {
    TUNE_COMMAND: "search one model's hyperparameters (--model) or all's (tuning/<name>/); "
                  "--workers N: a chief and N worker processes",
    TRAIN_COMMAND: "train one model (--model) or all (models/<name>/)",
}
INFER_COMMAND = "infer"
MONITOR_COMMAND = "monitor"
IMPORT_COMMAND = "import-model"


def step_commands() -> list[tuple[str, list[str], str]]:
    """(command, the steps it runs, help) for every step of the declared pipeline.

    Per-model steps share one command (`tune --model NAME`, `train --model NAME`).
    """
    commands: list[tuple[str, list[str], str]] = []
    for step in build_steps():
        if step.model is not None:
            entry = next((c for c in commands if c[0] == step.command), None)
            if entry is None:
                entry = (step.command, [], PER_MODEL_HELP.get(step.command, step.description))
                commands.append(entry)
            entry[1].append(step.name)
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
    if command in ("compile", INFER_COMMAND, MONITOR_COMMAND):
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
                            help="FER-2013 format CSV, or a folder of labelled images "
                                 "(one subfolder per class, optionally under train/ and "
                                 "test/); repeat to train on several (e.g. the original "
                                 "data plus reviewed faces)")
        parser.add_argument("--ferplus-labels", metavar="CSV",
                            help="FER+ votes (Microsoft's fer2013new.csv) for the FER-2013 "
                                 "CSV, joined row by row (ingest.ferplus_labels)")
    parser.add_argument("--config", help="YAML or JSON file overriding core/config.py")
    parser.add_argument("--profile", default="default", choices=["default", "smoke"],
                        help="'smoke' shrinks training for tests and demos")
    parser.add_argument("--force", action="store_true",
                        help="re-run steps even when inputs, parameters and code are unchanged")
    if any(SCHEMA in step.inputs.values() for step in steps):
        parser.add_argument("--allow-anomalies", action="store_true",
                            help="go on when data validation finds anomalies (still reported)")
    if any(step.name.startswith(f"{TRAIN_COMMAND}-") for step in steps):
        parser.add_argument("--warm-start", action="store_true",
                            help="start each model from the weights of its version in "
                                 "serving, when architecture and contract match "
                                 "(train.warm_start)")
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
    synth.add_argument("--ferplus-votes", metavar="CSV",
                       help="also write synthetic FER+ votes for it (fer2013new.csv's columns)")

    run = commands.add_parser("run", help="run the whole pipeline (or --steps)",
                              description="CSV to pushed models.", epilog=BEAM_EPILOG)
    _add_step_flags(run, _steps_of("run"))
    run.add_argument("--tune", action="store_true",
                     help="run the tune steps before training (tune.enabled; off by default)")
    run.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    run.add_argument("--models", default=",".join(MODEL_NAMES),
                     help="which registered models to train/evaluate/push")

    for name, _, help_text in STEP_COMMANDS:
        step = commands.add_parser(name, help=help_text, description=help_text,
                                   epilog=BEAM_EPILOG if takes_beam_options(name) else None)
        _add_step_flags(step, _steps_of(name))
        if name in PER_MODEL_HELP:
            step.add_argument("--model", choices=MODEL_NAMES,
                              help=f"{name} only this model (default: all)")
        if name == TUNE_COMMAND:
            step.add_argument("--workers", type=int, metavar="N",
                              help="a chief and N worker processes search together "
                                   "(KerasTuner's distributed mode; default tune.workers, 0)")
        if name in ("evaluate", "infra-validate", "push"):
            step.add_argument("--models", default=",".join(MODEL_NAMES),
                              help=f"which registered models to {name} (comma-separated)")

    _add_import_command(commands)

    lineage = commands.add_parser(
        "lineage", help="where a served model version came from (ML Metadata)",
        description="For a pushed model version: the data file and its fingerprint, rejected "
        "rows, statistics and anomalies verdict, transform, training run, evaluation "
        "metrics and the blessing that let it through.")
    lineage.add_argument("--output", required=True, help="run root")
    lineage.add_argument("--model", choices=MODEL_NAMES + IMPORTED_NAMES,
                         help="default: every model")
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
    compile_.add_argument("--models",
                          help="which registered models the pipeline trains (comma-separated; "
                          f"default: {','.join(MODEL_NAMES)}, or none beside --import-model)")
    compile_.add_argument("--tune", action="store_true",
                          help="include the tune steps (tune.enabled) before training")
    compile_.add_argument("--image", default="fer-pipeline:latest",
                          help="container image the components run in (see Dockerfile)")
    compile_.add_argument("--import-model", metavar="KERAS_FILE",
                          help="a Keras .h5/.keras file (gs:// or s3:// URI, or a path the "
                          "pods see) the pipeline imports, evaluates, infra-validates and "
                          "pushes as `import-model` does")
    compile_.add_argument("--import-model-name", choices=IMPORTED_NAMES, metavar="NAME",
                          help="its name in the pipeline (import-model --name): "
                          + ", ".join(IMPORTED_NAMES))
    compile_.add_argument("--import-input-shape", type=_input_shape, metavar="H,W,C",
                          help="its input size, where the file leaves it open "
                          "(import-model --input-shape)")
    compile_.add_argument("--import-scale", type=_scale, metavar="S",
                          help="what its training multiplied 0-255 pixels by "
                          "(import-model --scale; default 1/255)")
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
        "each model and combined by the ensemble rule; writes predictions and rejected rows "
        "as CSV shards, PredictionLog TFRecords and inference.json into a new directory "
        "under --output, committed there by COMMIT.json once complete.")
    infer.add_argument("--data", required=True, help="FER-2013 format CSV, or a directory "
                       "of images (local, gs:// or s3://)")
    infer.add_argument("--output", required=True, help="directory the predictions go to")
    infer.add_argument("--serving-root", required=True,
                       help="the pushed models (e.g. RUN/serving_models): its models.config "
                            "says which versions are served")
    infer.add_argument("--models", default="",
                       help="comma-separated; NAME runs the served version, NAME:VERSION "
                            "that version (default: every model the serving root's "
                            "models.config serves)")
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


def _add_import_command(commands) -> None:
    """`import-model`: a Keras file trained elsewhere as a candidate (imported/<name>/)."""
    names = "; ".join(f"{name}: {entry.description}" for name, entry in IMPORTED_MODELS.items())
    parser = commands.add_parser(
        IMPORT_COMMAND, help="wrap a Keras .h5/.keras file (e.g. the notebook's) as a "
        "candidate model (imported/<name>/)",
        description="Wraps a Keras file trained outside the pipeline with the serving "
        "signatures; `evaluate`, `infra-validate` and `push` with --models NAME then take it "
        f"like a trained model. Names: {names}.")
    parser.add_argument("--output", required=True, help="run root holding a committed "
                        "transform step (local directory or gs:// / s3:// URI)")
    parser.add_argument("--keras", required=True, metavar="FILE",
                        help="the .h5 or .keras file")
    parser.add_argument("--name", required=True, choices=IMPORTED_NAMES,
                        help="the model's name in the pipeline")
    parser.add_argument("--input-shape", type=_input_shape, metavar="H,W,C",
                        help="the model's input size, where the file leaves it open")
    parser.add_argument("--scale", type=_scale, metavar="S",
                        help="what the model's training multiplied 0-255 pixels by, e.g. "
                        "1/255 (the default)")
    parser.add_argument("--config", help="YAML or JSON file overriding core/config.py")
    parser.add_argument("--profile", default="default", choices=["default", "smoke"])
    parser.add_argument("--force", action="store_true",
                        help="re-import even when the file and settings are unchanged")
    parser.add_argument("--metadata-db", help="ML Metadata SQLite file "
                        "(default: <output>/metadata.sqlite)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _input_shape(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH,CHANNELS, e.g. 48,48,1; "
                                         f"got {text!r}")
    return values


def _scale(text: str) -> float:
    try:
        numerator, _, denominator = text.partition("/")
        value = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or fraction, e.g. "
                                         f"1/255; got {text!r}")
    return value


def unknown_beam_options(beam_args: list[str]) -> list[str]:
    """The arguments among `beam_args` that no Beam pipeline option takes.

    Beam itself only logs "Discarding unparseable args" for those and runs on, so a typo
    would be silently ignored; we parse with Beam's own option classes and refuse them.
    """
    from apache_beam.options import pipeline_options as beam_options

    from fer_pipeline.core import beam_job  # noqa: F401 - declares the job-server options we pass on

    class BeamOptionParser(beam_options._BeamArgumentParser):  # Beam's (ValueProviders)
        def error(self, message: str):   # argparse would print Beam's whole usage
            raise ConfigError(f"Beam option: {message}")

    parser = BeamOptionParser()
    classes = {str(cls): cls for cls in beam_options.PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(beam_args)
    return unknown


def parse_command_line(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    """Our arguments and the Beam options; a flag nobody takes is a usage error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args, []
    if takes_beam_options(args.command):
        unknown = unknown_beam_options(extra)
        if unknown:
            raise ConfigError(f"{args.command}: unrecognized argument(s) "
                              f"{' '.join(redact_beam_args(unknown))}: "
                            f"neither `fer-pipeline {args.command}` nor Beam takes them "
                            f"(see `fer-pipeline {args.command} --help`)")
        return args, extra
    raise ConfigError(f"{args.command}: unrecognized argument(s) "
                      f"{' '.join(redact_beam_args(extra))} (see "
                    f"`fer-pipeline {args.command} --help`; Beam options are taken only by "
                    f"run, compile, infer, monitor and the Beam steps)")
