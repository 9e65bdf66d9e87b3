"""`fer-pipeline`: run the whole pipeline, or one step, from the command line.

Commands that run Beam (`run`, `compile`, `infer`, `monitor` and the Beam steps: ingest,
augment, statistics, transform) pass Beam pipeline options through untouched, e.g.
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

from fer_pipeline.core import quiet, tf_cpu
from fer_pipeline.core.config import MODEL_NAMES, PipelineConfig, load_config
from fer_pipeline.pipeline.cli_parser import (IMPORT_COMMAND, INFER_COMMAND, MONITOR_COMMAND,
                                             PER_MODEL_HELP, STEP_COMMANDS, parse_command_line)
from fer_pipeline.pipeline.dag import build_steps
from fer_pipeline.core.errors import (EXIT_USAGE, exit_process, is_user_error, run_cli, ConfigError,
                                      MissingInputError)

EXIT_DRIFT = 1         # `monitor`: a drift threshold was crossed (a scheduler retrains)

# Before any step imports TensorFlow (none is imported above): the reason is in the module.
tf_cpu.prefer_onednn()


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
    if getattr(args, "ferplus_labels", None):
        from fer_pipeline.core import fileio

        overrides.setdefault("ingest", {})["ferplus_labels"] = fileio.absolute(args.ferplus_labels)
    if getattr(args, "warm_start", False):
        overrides.setdefault("train", {})["warm_start"] = True
    if getattr(args, "tune", False):
        overrides.setdefault("tune", {})["enabled"] = True
    if getattr(args, "workers", None) is not None:
        overrides.setdefault("tune", {})["workers"] = args.workers
    if args.command == IMPORT_COMMAND:
        from fer_pipeline.core import fileio

        given = {"keras_file": fileio.absolute(args.keras), "input_shape": args.input_shape}
        if args.scale is not None:
            given["scale"] = args.scale
        overrides["imports"] = {args.name: given}
    return load_config(getattr(args, "config", None), profile=getattr(args, "profile", "default"),
                       overrides=overrides)


def _steps_for(args: argparse.Namespace) -> Optional[list[str]]:
    if args.command == "run":
        return args.steps.split(",") if args.steps else None
    if args.command in PER_MODEL_HELP:   # train, tune
        return [f"{args.command}-{m}" for m in ([args.model] if args.model else MODEL_NAMES)]
    if args.command == IMPORT_COMMAND:
        return [f"import-{args.name}"]
    return next(steps for name, steps, _ in STEP_COMMANDS if name == args.command)


def _models(args: argparse.Namespace) -> tuple[str, ...]:
    if args.command in PER_MODEL_HELP and args.model:
        return (args.model,)
    if args.command == IMPORT_COMMAND:
        return (args.name,)
    return tuple(getattr(args, "models", ",".join(MODEL_NAMES)).split(","))


def _run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from fer_pipeline.pipeline.runner import RunContext, run_pipeline

    ctx = RunContext(data_paths=getattr(args, "data", None) or [], run_root=args.output,
                     config=_config_from_args(args), beam_args=beam_args, force=args.force,
                     models=_models(args))
    outcomes = {o.step: o for o in run_pipeline(ctx, _steps_for(args))}
    if args.command == IMPORT_COMMAND:
        print(f"[fer-pipeline] {_imported_line(args, outcomes[f'import-{args.name}'])}")
    if "push" in outcomes:
        gate, infra = _summaries(outcomes, "evaluate"), _summaries(outcomes, "infra-validate")
        for model, push in sorted(outcomes["push"].manifest["result"].get("models", {}).items()):
            for line in _closing_lines(model, push, gate.get(model), infra.get(model)):
                print(f"[fer-pipeline] {line}", flush=True)
    return 0


def _imported_line(args: argparse.Namespace, outcome) -> str:
    result = outcome.manifest["result"]
    adapted = [what for what, done in (("resized from 48x48", result["resized"]),
                                       ("grey channel repeated", result["channels_repeated"]))
               if done]
    return (f"{args.name}: imported {result['keras_file']} (sha256 {result['sha256']}); "
            f"input {'x'.join(map(str, result['input_shape']))}"
            + (f" ({', '.join(adapted)})" if adapted else "")
            + f", pixels x {result['scale']:.6g}; next: fer-pipeline evaluate --output "
            f"{args.output} --models {args.name}")


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
    from fer_pipeline.core.credentials import left_out_note, without_secrets
    from fer_pipeline.pipeline.kfp_pipeline import compile_inference_pipeline, compile_pipeline

    directory = os.path.dirname(os.path.abspath(args.kfp))
    if not os.path.isdir(directory):
        raise MissingInputError(f"compile: cannot write {args.kfp}: directory {directory} does not "
                                "exist")
    if args.monitor:
        from fer_pipeline.pipeline.kfp_pipeline import compile_monitor_pipeline

        path = compile_monitor_pipeline(args.kfp, image=args.image)
        print(f"[fer-pipeline] wrote the Kubeflow monitoring pipeline to {path}")
        return 0
    _, left_out = without_secrets(beam_args)
    if left_out:   # never baked into the YAML (core/credentials.py); say how pods get them
        print(f"[fer-pipeline] {left_out_note(left_out)}")
    if args.bulk_inference:
        path = compile_inference_pipeline(args.kfp, beam_args=beam_args, image=args.image)
        print(f"[fer-pipeline] wrote the Kubeflow bulk-inference pipeline to {path}")
        return 0
    models, overrides = _compiled_models(args)
    if args.tune:
        overrides["tune"] = {"enabled": True}
    path = compile_pipeline(args.kfp, load_config(overrides=overrides or None), models=models,
                            beam_args=beam_args, image=args.image)
    print(f"[fer-pipeline] wrote the Kubeflow pipeline to {path}"
          + (f" (importing {args.import_model} as {args.import_model_name})"
             if args.import_model else ""))
    return 0


def _compiled_models(args: argparse.Namespace) -> tuple[tuple[str, ...], dict]:
    """The models `compile` puts in the pipeline, and the config overrides naming an
    imported Keras file: with --import-model the pipeline runs import-<NAME> (the file read
    from where the pods see it, hashed, wrapped), then evaluate, infra-validate and push for
    it, as `import-model` and those commands do locally; the DAG is the declared one."""
    from fer_pipeline.core import fileio
    from fer_pipeline.core.config import IMPORTED_NAMES

    models = tuple(args.models.split(",")) if args.models else ()
    if not args.import_model:
        if any(m in IMPORTED_NAMES for m in models):
            raise ConfigError(f"compile --models {args.models}: an imported model needs its "
                              "file: --import-model KERAS_FILE --import-model-name NAME")
        return models or MODEL_NAMES, {}
    name = args.import_model_name
    if not name:
        raise ConfigError(f"compile --import-model needs --import-model-name, one of "
                          f"{', '.join(IMPORTED_NAMES)}")
    keras_file = fileio.absolute(args.import_model)
    if not keras_file.lower().endswith((".h5", ".hdf5", ".keras")):
        raise ConfigError(f"--import-model {args.import_model}: expected a Keras .h5 or "
                          ".keras file")
    if not fileio.is_uri(keras_file) and not os.path.exists(keras_file):
        raise MissingInputError(f"--import-model {args.import_model}: no such file")
    given = {"keras_file": keras_file, "input_shape": args.import_input_shape}
    if args.import_scale is not None:
        given["scale"] = args.import_scale
    return tuple(m for m in models if m != name) + (name,), {"imports": {name: given}}


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


def _monitor(args: argparse.Namespace, beam_args: list[str]) -> int:
    import dataclasses

    from fer_pipeline.core import fileio
    from fer_pipeline.pipeline.monitor_command import default_output, parse_moment, run_monitor_job

    config = _config_from_args(args)
    if args.min_requests is not None:
        if args.min_requests < 1:
            raise ConfigError(f"monitor: --min-requests must be at least 1, got "
                              f"{args.min_requests}")
        config = dataclasses.replace(config, monitor=dataclasses.replace(
            config.monitor, min_requests=args.min_requests))
    since = parse_moment(args.since) if args.since else None
    until = parse_moment(args.until) if args.until else None
    if since and until and since >= until:
        raise ConfigError(f"monitor: --since {args.since} is not before --until {args.until}")
    output = fileio.absolute(args.out or default_output(args.output))
    result = run_monitor_job(args.output, args.logs, output, config, since, until,
                             args.review_queue, serving_root=args.serving_root or "",
                             beam_args=beam_args)
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
        # `?`: used when present (train without a tune output); "off": run only when asked.
        inputs = ", ".join(f"{k}<-{v}{'?' if k in step.optional_inputs else ''}"
                           for k, v in step.inputs.items())
        off = " (off unless asked)" if step.enabled is not None else ""
        print(f"{step.name:<12} {step.directory + '/':<14} in: {inputs}{off}")
        print(f"{'':<12} {'':<14} out: {', '.join(step.outputs)}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.runner import committed_output

    print(committed_output(args.output, args.ref))
    return 0


def _main(argv: Optional[list[str]] = None) -> int:
    try:
        args, beam_args = parse_command_line(argv)
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        handlers = {"synth": lambda: _synth(args), "lineage": lambda: _lineage(args),
                    "compile": lambda: _compile(args, beam_args), "dag": lambda: _dag(args),
                    INFER_COMMAND: lambda: _infer(args, beam_args),
                    MONITOR_COMMAND: lambda: _monitor(args, beam_args),
                    "path": lambda: _path(args)}
        return handlers.get(args.command, lambda: _run(args, beam_args))()
    except Exception as error:  # noqa: BLE001 - only user errors are answered here
        # Bad arguments, bad config, bad data (too many rejected rows), missing inputs, a
        # file that cannot be written: a user error (core/errors.py), said in our words, no
        # trace. Anything else is our bug: run_cli says where its trace is.
        if not is_user_error(error):
            raise
        print(f"[fer-pipeline] error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _synth(args: argparse.Namespace) -> int:
    from fer_pipeline.pipeline.synthetic import generate_csv

    if args.rows < 1:
        raise ConfigError(f"synth: --rows must be at least 1, got {args.rows}")
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise MissingInputError(f"synth: cannot write {args.out}: directory {directory} does not exist")
    result = generate_csv(args.out, rows=args.rows, seed=args.seed,
                          include_usage=not args.no_usage)
    classes = ", ".join(f"{name} {count}" for name, count in result.label_counts.items())
    splits = ", ".join(f"{usage} {count}" for usage, count in result.usage_counts.items())
    print(f"[fer-pipeline] wrote {result.rows} synthetic faces (seed {result.seed}) to "
          f"{result.path} in {result.seconds:.1f} s: {classes}" + (f"; {splits}" if splits else ""))
    if args.ferplus_votes:
        from fer_pipeline.pipeline.synthetic_ferplus import generate_ferplus_votes

        votes = generate_ferplus_votes(args.out, args.ferplus_votes, seed=args.seed)
        print(f"[fer-pipeline] wrote synthetic FER+ votes for its {votes['rows']} rows to "
              f"{args.ferplus_votes} ({votes['contempt']} faces leaning to contempt, "
              f"{votes['not_face']} mostly not a face)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The CLI: a user's mistake ends in one `error:` line, a bug in one line saying where
    its traceback is (core/errors.py)."""
    return run_cli("fer-pipeline", _main, argv)


def entry_point() -> NoReturn:
    """The `fer-pipeline` console script (fer_pipeline.core.errors.exit_process says why it ends so)."""
    quiet.install()  # before any step imports TensorFlow (none is imported above)
    exit_process(main())


if __name__ == "__main__":
    entry_point()
