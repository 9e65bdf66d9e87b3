"""Pusher tests: versioning, retention, refusals, models.config, and crash safety.

The models are tiny real SavedModels (see tests/test_evaluator.py); the crash tests check
that a push interrupted at any point never leaves an integer-named (servable) directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fer_pipeline.components import pusher
from fer_pipeline.components.pusher import run_pusher, served_versions
from fer_pipeline.core.config import EvalConfig, PushConfig
from fer_pipeline.core.serving_root import read_model_server_config
from tests.test_evaluator import make_model_dir, write_test_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> Path:
    """One good (80 %) and one bad (20 %) model, built once and copied by each test."""
    root = tmp_path_factory.mktemp("built")
    make_model_dir(root, "good", shift=0, scale=3.0)
    make_model_dir(root, "bad", shift=6, scale=2.0)
    return root


def model_dir(saved_models: Path, tmp_path: Path, source: str, name: str,
              variant: str = "") -> str:
    """A copy of a built model; a `variant` note makes its files differ from other copies
    (TF Serving ignores assets.extra/), as a retrained model's would."""
    target = tmp_path / "models" / name
    shutil.copytree(saved_models / source, target)
    if variant:
        extra = target / "serving_model" / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / "variant.txt").write_text(variant)
    return str(target)


def bless(evaluation_dir: Path, verdicts: dict[str, bool]) -> str:
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    (evaluation_dir / "blessings.json").write_text(json.dumps({
        name: {"blessed": ok, "reasons": [f"accuracy {'0.800 >=' if ok else '0.200 <'} 0.300"]}
        for name, ok in verdicts.items()}))
    return str(evaluation_dir)


def visible_entries(model_root: Path) -> list[str]:
    return sorted(p.name for p in model_root.iterdir())


def test_blessed_model_gets_increasing_versions_and_old_ones_are_pruned(saved_models, tmp_path):
    import tensorflow as tf

    retrained = [{"cnn": model_dir(saved_models, tmp_path, "good", f"cnn-{i}", f"run {i}")}
                 for i in range(3)]
    evaluation = bless(tmp_path / "evaluation", {"cnn": True})
    serving = tmp_path / "serving"
    config = PushConfig(keep_versions=2)

    first = run_pusher(retrained[0], evaluation, None, str(serving), str(tmp_path / "push1"),
                       config)
    assert first.models["cnn"].pushed and first.models["cnn"].version == 1
    assert first.models["cnn"].reasons == ["accuracy 0.800 >= 0.300"]
    second = run_pusher(retrained[1], evaluation, None, str(serving), str(tmp_path / "push2"),
                        config)
    assert second.models["cnn"].version == 2 and second.models["cnn"].removed_versions == []
    third = run_pusher(retrained[2], evaluation, None, str(serving), str(tmp_path / "push3"),
                       config)
    assert third.models["cnn"].version == 3 and third.models["cnn"].removed_versions == [1]
    assert visible_entries(serving / "cnn") == ["2", "3"]       # no temp dirs left either

    # What landed is a complete, loadable SavedModel with the contract's signatures.
    loaded = tf.saved_model.load(str(serving / "cnn" / "3"))
    assert {"serving_default", "serving_uint8", "serving_examples"} <= set(loaded.signatures)
    out = loaded.signatures["serving_default"](pixels=tf.zeros([1, 48, 48], tf.int32))
    assert out["probabilities"].shape == (1, 7)

    specs = read_model_server_config(third.models_config)
    assert [(s.name, s.base_path, s.version_policy, s.num_latest) for s in specs] == [
        ("cnn", str((serving / "cnn").resolve()), "latest", 1)]
    assert os.path.isabs(specs[0].base_path)
    # The twin for the TF Serving Docker image, which sees the serving root at /models.
    docker_specs = read_model_server_config(third.docker_models_config)
    assert [(s.name, s.base_path) for s in docker_specs] == [("cnn", "/models/cnn")]
    assert "--model_config_file=/models/models.docker.config" in third.tfserving_command
    assert "--model_config_file_poll_wait_seconds=" in third.tfserving_command
    assert f"{serving.resolve()}:/models" in third.tfserving_command
    record = json.loads((tmp_path / "push3" / "push.json").read_text())
    assert record["models"]["cnn"]["version"] == 3
    assert record["models_config"] == third.models_config


def test_candidate_identical_to_the_served_version_is_not_pushed_again(saved_models, tmp_path):
    dirs = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn")}
    evaluation = bless(tmp_path / "evaluation", {"cnn": True})
    serving = tmp_path / "serving"
    assert run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push1"),
                      PushConfig()).models["cnn"].version == 1

    # The same trained model again (a re-run of the push step): byte for byte what is served.
    again = run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push2"),
                       PushConfig())
    outcome = again.models["cnn"]
    assert not outcome.pushed and outcome.version is None
    assert outcome.reasons == ["identical to served version 1", "accuracy 0.800 >= 0.300"]
    assert visible_entries(serving / "cnn") == ["1"]
    assert served_versions(str(serving), "cnn") == [1]
    record = json.loads((tmp_path / "push2" / "push.json").read_text())
    assert record["models"]["cnn"]["pushed"] is False

    # Any change to the files is a new version.
    changed = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn-2", "retrained")}
    assert run_pusher(changed, evaluation, None, str(serving), str(tmp_path / "push3"),
                      PushConfig()).models["cnn"].version == 2


def test_served_versions_follow_models_config(saved_models, tmp_path):
    from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config

    serving = tmp_path / "serving"
    for version in (1, 2, 3):
        (serving / "cnn" / str(version)).mkdir(parents=True)
    (serving / "cnn" / ".tmp-4-abcd").mkdir()
    # No config: every integer directory (each was published by a rename).
    assert served_versions(str(serving), "cnn") == [1, 2, 3]
    write_model_server_config(str(serving / "models.config"), [
        ModelSpec("cnn", str(serving / "cnn"), "specific", versions=[1, 2, 7])])
    assert served_versions(str(serving), "cnn") == [1, 2]       # 7 is named but absent
    assert pusher.latest_served_version(str(serving), "cnn") == (2, str(serving / "cnn" / "2"))
    assert served_versions(str(serving), "vgg16") == []         # not configured: not served
    write_model_server_config(str(serving / "models.config"), [
        ModelSpec("cnn", str(serving / "cnn"), "latest", num_latest=2)])
    assert served_versions(str(serving), "cnn") == [2, 3]


def test_unblessed_model_is_not_pushed_and_reasons_are_kept(saved_models, tmp_path):
    dirs = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn"),
            "vgg16": model_dir(saved_models, tmp_path, "bad", "vgg16"),
            "extra": model_dir(saved_models, tmp_path, "good", "extra")}
    evaluation = bless(tmp_path / "evaluation", {"cnn": True, "vgg16": False})
    serving = tmp_path / "serving"
    result = run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push"),
                        PushConfig())

    assert result.models["cnn"].pushed
    refused = result.models["vgg16"]
    assert not refused.pushed and refused.version is None
    assert refused.reasons == ["not blessed", "accuracy 0.200 < 0.300"]
    assert not result.models["extra"].pushed
    assert "no blessing recorded" in result.models["extra"].reasons[0]
    assert not (serving / "vgg16").exists() and not (serving / "extra").exists()
    assert [s.name for s in read_model_server_config(result.models_config)] == ["cnn"]
    record = json.loads(Path(result.push_json).read_text())
    assert record["models"]["vgg16"]["reasons"] == refused.reasons


def test_regression_found_by_the_evaluator_keeps_the_served_version(saved_models, tmp_path):
    from fer_pipeline.components.evaluator import run_evaluator

    write_test_split(tmp_path / "examples", n=140)
    serving = tmp_path / "serving"
    eval_config = EvalConfig(min_accuracy={"cnn": 0.1}, max_regression=0.05)
    good = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn")}
    run_evaluator(str(tmp_path / "examples"), good, str(serving), str(tmp_path / "eval1"),
                  eval_config)
    assert run_pusher(good, str(tmp_path / "eval1"), None, str(serving), str(tmp_path / "push1"),
                      PushConfig()).models["cnn"].version == 1

    # A retrained "cnn" that is worse than the served one passes the absolute floor (0.1)
    # but not the regression check, so version 1 stays the only one.
    worse = {"cnn": model_dir(saved_models, tmp_path, "bad", "cnn-retrained")}
    result = run_evaluator(str(tmp_path / "examples"), worse, str(serving),
                           str(tmp_path / "eval2"), eval_config)
    assert result.blessed == {"cnn": False}
    push = run_pusher(worse, str(tmp_path / "eval2"), None, str(serving), str(tmp_path / "push2"),
                      PushConfig())
    assert not push.models["cnn"].pushed
    assert any("served version 1" in r for r in push.models["cnn"].reasons)
    assert served_versions(str(serving), "cnn") == [1]


def fail_copy_after(monkeypatch, copies: int, message: str) -> list[str]:
    """Makes the pusher's per-file copy raise OSError(message) after `copies` files;
    returns the list of files copied before that (filled as the push runs)."""
    copied: list[str] = []
    real_copy = pusher._copy_file

    def copy_then_fail(src, dst):
        if len(copied) == copies:
            raise OSError(message)
        copied.append(dst)
        return real_copy(src, dst)

    monkeypatch.setattr(pusher, "_copy_file", copy_then_fail)
    return copied


def test_exception_mid_copy_leaves_nothing_visible(saved_models, tmp_path, monkeypatch):
    dirs = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn")}
    evaluation = bless(tmp_path / "evaluation", {"cnn": True})
    serving = tmp_path / "serving"
    copied = fail_copy_after(monkeypatch, 2, "disk full (injected)")
    with pytest.raises(OSError, match="injected"):
        run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push"), PushConfig())
    assert len(copied) == 2                      # the crash really happened mid-copy
    assert served_versions(str(serving), "cnn") == []
    assert visible_entries(serving / "cnn") == []

    monkeypatch.undo()                           # the real copy again
    result = run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push"),
                        PushConfig())
    assert result.models["cnn"].version == 1
    assert visible_entries(serving / "cnn") == ["1"]


# A separate process that pushes, pauses after copying one file (as if the machine died
# there), and is then killed with SIGKILL: no except/finally clause gets to clean up.
_KILLED_PUSH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fer_pipeline.components import pusher
    from fer_pipeline.core.config import PushConfig

    model_dir, evaluation, serving, output, marker = sys.argv[1:]
    real_copy = pusher._copy_file

    def copy_then_hang(src, dst):
        real_copy(src, dst)
        Path(marker).write_text(dst)
        time.sleep(120)

    pusher._copy_file = copy_then_hang
    pusher.run_pusher({"cnn": model_dir}, evaluation, None, serving, output, PushConfig())
""")


def test_push_killed_mid_copy_leaves_only_a_hidden_temp_that_the_next_push_removes(
        saved_models, tmp_path):
    dirs = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn")}
    evaluation = bless(tmp_path / "evaluation", {"cnn": True})
    serving = tmp_path / "serving"
    marker = tmp_path / "copied-one-file"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUSH, dirs["cnn"], evaluation, str(serving),
         str(tmp_path / "push-killed"), str(marker)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert child.poll() is None, "the pushing process exited before copying"
            assert time.time() < deadline, "the pushing process never started copying"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    leftovers = visible_entries(serving / "cnn")
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-1-")   # hidden, not servable
    assert served_versions(str(serving), "cnn") == []
    assert not (serving / "models.config").exists()

    result = run_pusher(dirs, evaluation, None, str(serving), str(tmp_path / "push"),
                        PushConfig())
    assert result.models["cnn"].version == 1
    assert visible_entries(serving / "cnn") == ["1"]                     # stale temp removed


def test_missing_blessings_and_bad_config_fail_loudly(saved_models, tmp_path):
    dirs = {"cnn": model_dir(saved_models, tmp_path, "good", "cnn")}
    with pytest.raises(FileNotFoundError, match="run the evaluator"):
        run_pusher(dirs, str(tmp_path / "nowhere"), None, str(tmp_path / "serving"),
                   str(tmp_path / "push"), PushConfig())
    with pytest.raises(ValueError, match="keep_versions"):
        run_pusher(dirs, bless(tmp_path / "evaluation", {"cnn": True}), None,
                   str(tmp_path / "serving"), str(tmp_path / "push"), PushConfig(keep_versions=0))
