"""The `fer-pipeline` door: a mistake on the command line is one line and a non-zero exit,
nothing is created by a command that fails on its arguments, each command shows and takes
only its own flags (Beam options only where Beam runs), every record holds absolute paths,
and a bug in our code says so in one line with where its traceback is.

Table-driven and in-process (`fer_pipeline.pipeline.cli.main`), so no case pays for a Python start.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fer_pipeline.pipeline import cli, cli_parser
from fer_pipeline.core import errors
from fer_pipeline.core.artifacts import COMMIT_FILE, read_commit
from fer_pipeline.core.config import load_config
from fer_pipeline.pipeline.dag import DATA, Step, StepEnv
from fer_pipeline.pipeline.metadata import MetadataStore
from fer_pipeline.pipeline.runner import RunContext, run_step


def _fer_pipeline(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# (arguments, with {run}, {csv} and {missing} filled in; exit status; words of the message)
MISTAKES = [
    (["train", "--output", "{run}", "--epochs", "3"], 2,
     ["unrecognized argument", "--epochs 3", "fer-pipeline train --help"]),
    (["validate", "--output", "{run}", "--vgg-weights", "imagenet"], 2,
     ["unrecognized argument", "--vgg-weights"]),
    (["push", "--output", "{run}", "--direct_num_workers=2"], 2,
     ["unrecognized argument", "--direct_num_workers=2", "Beam options"]),
    (["run", "--data", "{csv}", "--output", "{run}", "--epochs", "3"], 2,
     ["unrecognized argument", "--epochs 3", "nor Beam"]),
    (["ingest", "--data", "{csv}", "--output", "{run}", "--direct_num_workers=2",
      "--direct_num_wokers=2"], 2, ["--direct_num_wokers=2", "nor Beam"]),
    (["lineage", "--output", "{run}", "--beam"], 2, ["unrecognized argument", "--beam"]),
    (["ingest", "--data", "{missing}", "--output", "{run}"], 2,
     ["--data", "typo.csv", "no such file"]),
    (["ingest", "--data", "{tmp}", "--output", "{run}"], 2, ["no class folders"]),
    (["train", "--output", "{run}"], 2,
     ["train-cnn", "transform.transform", "does not exist", "fer-pipeline transform"]),
    (["lineage", "--output", "{run}"], 2,
     ["no ML Metadata store", "metadata.sqlite", "--output"]),
    (["path", "--output", "{run}", "evaluate"], 2, ["no run root", "--output"]),
    (["path", "--output", "{tmp}", "evaluate.bogus"], 2,
     ["no output 'bogus'", "evaluate.evaluation"]),
    (["path", "--output", "{tmp}", "evalute"], 2, ["unknown step 'evalute'", "evaluate"]),
    (["run", "--data", "{csv}", "--output", "{run}", "--steps", "ingest,trian"], 2,
     ["unknown steps", "trian"]),
    (["run", "--data", "{csv}", "--output", "{run}", "--models", "resnet"], 2,
     ["unknown models", "resnet"]),
    (["run", "--data", "{csv}", "--output", "{run}", "--config", "{missing}"], 2,
     ["config file", "does not exist"]),
    (["synth", "--rows", "0", "--out", "{run}/x.csv"], 2, ["--rows must be at least 1"]),
    (["synth", "--rows", "5", "--out", "{run}/x.csv"], 2, ["directory", "does not exist"]),
    (["train", "--output", "{run}", "--model", "resnet"], 2, ["invalid choice", "resnet"]),
]


@pytest.mark.parametrize("argv, status, words", MISTAKES,
                         ids=[f"{i}-{case[0][0]}" for i, case in enumerate(MISTAKES)])
def test_a_mistake_is_one_line_and_creates_nothing(tmp_path, capsys, small_csv, argv, status,
                                                    words):
    run_root = tmp_path / "mistyped" / "run"
    values = {"run": str(run_root), "csv": small_csv, "missing": str(tmp_path / "typo.csv"),
              "tmp": str(tmp_path)}
    args = [a.format(**values) for a in argv]
    try:
        got, output = _fer_pipeline(capsys, *args)
    except SystemExit as exit_:        # argparse's own usage errors
        got, output = exit_.code, capsys.readouterr().err
    assert got == status, output
    assert "Traceback" not in output
    for word in words:
        assert word in output, (word, output)
    assert not (tmp_path / "mistyped").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


HELP = {  # command: flags its help must list, flags it must not
    "ingest": (["--data", "--output", "--config", "Beam pipeline options"],
               ["--vgg-weights", "--serving-root", "--allow-anomalies", "--model "]),
    "train": (["--model", "--vgg-weights"], ["--data", "--serving-root", "Beam pipeline"]),
    "validate": (["--allow-anomalies"], ["--data", "--vgg-weights", "Beam pipeline"]),
    "evaluate": (["--serving-root", "--models"], ["--data", "--vgg-weights"]),
    "push": (["--serving-root"], ["--data", "--allow-anomalies", "Beam pipeline"]),
    "transform": (["Beam pipeline options"], ["--data", "--serving-root"]),
    "run": (["--data", "--vgg-weights", "--serving-root", "--allow-anomalies", "--steps",
             "Beam pipeline options"], []),
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_each_command_shows_its_own_flags(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    present, absent = HELP[command]
    for flag in present:
        assert flag in text, (command, flag)
    for flag in absent:
        assert flag not in text, (command, flag)


def test_beam_options_pass_only_where_beam_runs():
    assert cli_parser.takes_beam_options("ingest") and cli_parser.takes_beam_options("run")
    assert cli_parser.takes_beam_options("compile")
    assert cli_parser.takes_beam_options("monitor")   # its Beam job (components/monitor/job.py)
    assert not cli_parser.takes_beam_options("train") and not cli_parser.takes_beam_options("lineage")
    assert cli_parser.unknown_beam_options(["--runner=DirectRunner", "--direct_num_workers=2",
                                     "--epochs", "3"]) == ["--epochs", "3"]


def test_a_bug_is_one_line_with_where_its_traceback_is(capsys, monkeypatch, tmp_path):
    def broken(args):
        raise ZeroDivisionError("division by zero in the dag printer")

    monkeypatch.setattr(cli, "_dag", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    status, output = _fer_pipeline(capsys, "dag")
    assert status == errors.EXIT_BUG
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "bug in fer-pipeline" in output and "ZeroDivisionError" in output
    [saved] = tmp_path.glob("fer-pipeline-crash-*.txt")
    assert str(saved) in output
    assert "Traceback" in saved.read_text() and "division by zero" in saved.read_text()

    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    status, output = _fer_pipeline(capsys, "dag")
    assert status == errors.EXIT_BUG and "Traceback" in output and "broken" in output


def test_a_libraries_value_error_is_a_bug_and_ours_is_the_users(capsys, monkeypatch, tmp_path):
    """A ValueError our code raises carries a message for the user; one raised inside a
    library (here numpy) is our bug and keeps its traceback."""
    def library_fails(args):
        np.zeros(3).reshape(4)

    monkeypatch.setattr(cli, "_dag", library_fails)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    status, output = _fer_pipeline(capsys, "dag")
    assert status == errors.EXIT_BUG and "bug in fer-pipeline" in output
    [saved] = tmp_path.glob("fer-pipeline-crash-*.txt")
    assert "reshape" in saved.read_text()

    status, output = _fer_pipeline(capsys, "run", "--data", str(tmp_path / "c.csv"),
                                   "--output", str(tmp_path / "run"),
                                   "--config", str(tmp_path / "missing.yaml"))
    assert status == errors.EXIT_USAGE and "missing.yaml does not exist" in output
    assert "bug" not in output and "Traceback" not in output
    assert errors.is_user_error(PermissionError(13, "Permission denied", "/x"))
    assert not errors.is_user_error(ValueError("raised without a traceback"))


# --- absolute paths in every record -------------------------------------------------------

def _copy_input(inputs, out, env: StepEnv):
    Path(out, "data.txt").write_text(Path(inputs["data"]).read_text())
    return {"rows": 1}


TOY = Step("toy", "toy", {"data": DATA}, {"toy": "", "file": "data.txt"}, _copy_input,
           lambda config, env: {}, ("tests.test_doors_cli",), "a toy step")


def test_records_hold_absolute_paths_whatever_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "input.csv").write_text("a,b\n")
    monkeypatch.chdir(tmp_path)
    ctx = RunContext(["input.csv"], "run", load_config(), run_id="test")
    store = MetadataStore(ctx.config.metadata, ctx.run_root, "test")
    outcome = run_step(TOY, ctx, store, {})
    record = json.loads((tmp_path / "run" / "toy" / COMMIT_FILE).read_text())
    manifest = record["manifest"]
    uris = [record["uri"], *(o["uri"] for o in record["outputs"].values()),
            *(i["uri"] for items in manifest["inputs"].values() for i in items)]
    described = store.find_completed("toy", outcome.commit.cache_key)
    uris += [a["uri"] for side in ("inputs", "outputs") for items in described[side].values()
             for a in items]
    uris.append(described["properties"]["execution_dir"])
    assert all(os.path.isabs(uri) for uri in uris), uris
    monkeypatch.chdir("/")
    assert read_commit(str(tmp_path / "run" / "toy")).output_uri("file") == str(
        tmp_path / "run" / "toy" / outcome.commit.execution / "data.txt")


def test_an_old_relative_commit_record_still_resolves(tmp_path, monkeypatch, capsys):
    """Runs recorded before paths were absolute name them relative to where they started."""
    execution = tmp_path / "demo_run" / "evaluation" / "x-0123"
    execution.mkdir(parents=True)
    old = {"step": "evaluate", "execution": "x-0123", "uri": "demo_run/evaluation/x-0123",
           "cache_key": "sha256:0", "manifest": {},
           "outputs": {"evaluation": {"uri": "demo_run/evaluation/x-0123",
                                      "fingerprint": "sha256:0"}}}
    (execution.parent / COMMIT_FILE).write_text(json.dumps(old))
    monkeypatch.chdir("/")
    assert read_commit(str(execution.parent)).uri == str(execution)
    status, output = _fer_pipeline(capsys, "path", "--output", str(tmp_path / "demo_run"),
                                   "evaluate.evaluation")
    assert status == 0 and output.strip() == str(execution)


def _reject_everything(inputs, out, env: StepEnv):
    report = Path(out, "rejected.csv")
    report.write_text("line,reason\n2,bad\n")
    raise ValueError(f"every row was rejected; rows and reasons in {report}")


def _crash(inputs, out, env: StepEnv):
    Path(out, "half.txt").write_text("half")
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("executor, keeps_report", [(_reject_everything, True),
                                                    (_crash, False)])
def test_a_failed_first_step_leaves_only_a_report_its_message_points_at(
        tmp_path, monkeypatch, executor, keeps_report):
    """The runner's cleanup, with a declared step swapped for a toy that fails (a real
    ingest that rejects every row costs a Beam pipeline for the same check)."""
    import fer_pipeline.pipeline.runner as runner

    failing = dataclasses.replace(TOY, executor=executor)
    monkeypatch.setattr(runner, "build_steps", lambda models: [failing])
    monkeypatch.setattr(runner, "STEP_NAMES", ("toy",))
    (tmp_path / "input.csv").write_text("a,b\n")
    ctx = RunContext([str(tmp_path / "input.csv")], str(tmp_path / "run"), load_config())
    with pytest.raises((ValueError, RuntimeError)) as error:
        runner.run_pipeline(ctx)
    assert not (tmp_path / "run" / "metadata.sqlite").exists()
    if keeps_report:
        report = str(error.value).split("rows and reasons in ")[1]
        assert Path(report).is_file()
        assert not (tmp_path / "run" / "toy" / COMMIT_FILE).exists()
    else:
        assert not (tmp_path / "run").exists()


def test_a_finished_run_answers_with_absolute_paths_from_any_directory(smoke_run, tmp_path,
                                                                       monkeypatch, capsys):
    """The session's smoke run, read only: `path`, ML Metadata and `lineage` name absolute
    paths that exist, asked from an unrelated working directory."""
    monkeypatch.chdir(tmp_path)
    for outcome in smoke_run.outcomes:
        status, output = _fer_pipeline(capsys, "path", "--output", smoke_run.run_root,
                                       outcome.step)
        assert status == 0, output
        assert os.path.isabs(output.strip()) and os.path.isdir(output.strip())
    store = MetadataStore(smoke_run.config.metadata, smoke_run.run_root)
    for outcome in smoke_run.outcomes:
        described = store.find_completed(outcome.step, outcome.commit.cache_key)
        uris = [a["uri"].split("#")[0] for side in ("inputs", "outputs")
                for items in described[side].values() for a in items]
        assert uris and all(os.path.isabs(uri) and os.path.exists(uri) for uri in uris), uris
    if store.pushed_versions():
        status, output = _fer_pipeline(capsys, "lineage", "--output", smoke_run.run_root,
                                       "--json")
        assert status == 0, output
        found = json.loads(output)
        named = [item[key] for item in found for key in ("served_path",)] + [
            item[step]["execution_dir"] for item in found
            for step in ("ingest", "statistics", "validation", "transform", "training",
                         "evaluation", "push")] + [d["uri"] for item in found
                                                  for d in item["data"]]
        assert all(os.path.isabs(path) for path in named), named
