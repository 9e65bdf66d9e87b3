"""`fer-pipeline`: run the whole pipeline, or one step, from the command line.

Arguments this CLI does not know are Beam pipeline options and go to Beam untouched, e.g.
`--runner=DataflowRunner --project=...` or
`--direct_running_mode=multi_processing --direct_num_workers=2`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from pipeline.config import PipelineConfig, load_config
from pipeline.runner import MODEL_NAMES, STEP_NAMES, PipelineError, RunContext, run_pipeline

# Step sub-commands: (command, runner step names it runs, help).
STEP_COMMANDS = [
    ("ingest", ["ingest"], "CSV -> split, quarantined, de-duplicated TFRecords (examples/)"),
    ("statistics", ["statistics"], "TFDV statistics per split + statistics.html (statistics/)"),
    ("validate", ["validate"], "validate statistics against the schema; drift (anomalies/)"),
    ("augment", ["augment"], "class-balancing augmentation of the training split (augmented/)"),
    ("transform", ["transform"], "tensorflow-transform normalization (transform/)"),
    ("train", None, "train one model (--model) or both (models/<name>/)"),
    ("evaluate", ["evaluate"], "test-split evaluation and the blessing gate (evaluation/)"),
    ("push", ["push"], "copy blessed models to the serving directory (push/)"),
]


def _add_common(parser: argparse.ArgumentParser, needs_data: bool) -> None:
    parser.add_argument("--output", required=True, help="run root: one directory per step")
    if needs_data:
        parser.add_argument("--data", required=True, help="FER-2013 format CSV")
    parser.add_argument("--config", help="YAML or JSON file overriding pipeline/config.py")
    parser.add_argument("--profile", default="default", choices=["default", "smoke"],
                        help="'smoke' shrinks training for tests and demos")
    parser.add_argument("--force", action="store_true",
                        help="re-run steps even when inputs and parameters are unchanged")
    parser.add_argument("--allow-anomalies", action="store_true",
                        help="go on when data validation finds anomalies (still reported)")
    parser.add_argument("--vgg-weights",
                        help="'none' (random init, default), 'imagenet' (downloads), or a .h5")
    parser.add_argument("--serving-root", help="where blessed models are pushed "
                        "(default: <output>/serving_models)")
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
                              description="CSV to pushed models; unknown flags go to Beam.")
    _add_common(run, needs_data=True)
    run.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    run.add_argument("--models", default=",".join(MODEL_NAMES),
                     help="which models to train/evaluate/push")

    for name, _, help_text in STEP_COMMANDS:
        step = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(step, needs_data=(name == "ingest"))
        if name == "train":
            step.add_argument("--model", choices=MODEL_NAMES,
                              help="train only this model (default: both)")
        if name in ("evaluate", "push"):
            step.add_argument("--models", default=",".join(MODEL_NAMES))
    return parser


def _config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides: dict = {}
    if args.allow_anomalies:
        overrides.setdefault("validation", {})["allow_anomalies"] = True
    if args.vgg_weights:
        overrides.setdefault("train", {})["vgg_weights"] = args.vgg_weights
    if args.serving_root:
        overrides.setdefault("push", {})["serving_root"] = args.serving_root
    return load_config(args.config, profile=args.profile, overrides=overrides)


def _steps_for(args: argparse.Namespace) -> Optional[list[str]]:
    if args.command == "run":
        return args.steps.split(",") if args.steps else None
    if args.command == "train":
        return [f"train-{m}" for m in ([args.model] if args.model else MODEL_NAMES)]
    return next(steps for name, steps, _ in STEP_COMMANDS if name == args.command)


def main(argv: Optional[list[str]] = None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "synth":
        from components.synthetic import generate_csv

        result = generate_csv(args.out, rows=args.rows, seed=args.seed,
                              include_usage=not args.no_usage)
        print(f"[fer-pipeline] wrote {args.rows} rows to {args.out}: {result}")
        return 0

    models = tuple(getattr(args, "models", ",".join(MODEL_NAMES)).split(","))
    if args.command == "train" and args.model:
        models = (args.model,)
    ctx = RunContext(data_path=getattr(args, "data", None), run_root=args.output,
                     config=_config_from_args(args), beam_args=beam_args, force=args.force,
                     models=models)
    try:
        run_pipeline(ctx, _steps_for(args))
    except PipelineError as error:
        print(f"[fer-pipeline] error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad data (e.g. too many rejected rows), bad config
        print(f"[fer-pipeline] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
