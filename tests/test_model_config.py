"""models.config round-trips through the real ModelServerConfig proto."""
from __future__ import annotations

import os

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from fer_pipeline.core.serving_root import (ConfigFileWatcher, ModelSpec, container_config,
                                  docker_command, read_model_server_config,
                                  write_model_server_config)


def test_round_trip_all_policies(tmp_path):
    specs = [
        ModelSpec("cnn", str(tmp_path / "cnn"), "latest", num_latest=2, labels={"stable": 3}),
        ModelSpec("vgg16", str(tmp_path / "vgg16"), "specific", versions=[1, 4],
                  labels={"stable": 1, "canary": 4}),
        ModelSpec("old", str(tmp_path / "old"), "all"),
    ]
    path = write_model_server_config(str(tmp_path / "models.config"), specs)
    assert read_model_server_config(path) == specs
    # No temp files left behind by the atomic write.
    assert sorted(os.listdir(tmp_path)) == ["models.config"]


def test_written_file_is_what_tf_serving_parses(tmp_path):
    path = write_model_server_config(
        str(tmp_path / "models.config"),
        [ModelSpec("cnn", "/models/cnn", "specific", versions=[7], labels={"stable": 7})])
    parsed = text_format.Parse(open(path).read(), model_server_config_pb2.ModelServerConfig())
    entry = parsed.model_config_list.config[0]
    assert entry.model_platform == "tensorflow"
    assert list(entry.model_version_policy.specific.versions) == [7]
    assert entry.version_labels["stable"] == 7


def test_missing_policy_means_latest_one(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "m" base_path: "/x" '
                    'model_platform: "tensorflow" } }')
    assert read_model_server_config(str(path)) == [ModelSpec("m", "/x")]


def test_bad_file_and_bad_spec_are_rejected(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("this is not a proto")
    with pytest.raises(ValueError, match="models.config"):
        read_model_server_config(str(path))
    with pytest.raises(ValueError, match="version_policy"):
        ModelSpec("m", "/x", "newest")
    with pytest.raises(ValueError, match="needs versions"):
        ModelSpec("m", "/x", "specific")


def test_config_watcher_rereads_on_change_and_keeps_the_last_good_specs(tmp_path):
    path = str(tmp_path / "models.config")
    with pytest.raises(OSError):                       # nothing to keep yet: the error stands
        ConfigFileWatcher(path).read()
    good = [ModelSpec("cnn", "/m/cnn")]
    write_model_server_config(path, good)
    watcher = ConfigFileWatcher(path)
    assert watcher.read() == (good, "")
    assert watcher.read() == (None, "")                # unchanged: not parsed again

    def edit(text: str, mtime_ns: int) -> None:        # a distinct mtime without sleeping
        with open(path, "w") as out:
            out.write(text)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    edit("model_config_list {\n  config { name: ", 10**18)
    specs, error = watcher.read()
    assert specs is None and "models.config" in error and "\n" not in error
    assert watcher.specs == good
    assert watcher.read() == (None, "")                # the same problem is reported once
    newer = [ModelSpec("cnn", "/m/cnn"), ModelSpec("mlp", "/m/mlp", "all")]
    write_model_server_config(path, newer)
    os.utime(path, ns=(2 * 10**18, 2 * 10**18))
    assert watcher.read() == (newer, "") and watcher.specs == newer
    edit("garbage", 3 * 10**18)
    assert watcher.read()[1]                           # a new failure is reported again

    broken = ConfigFileWatcher(path)
    with pytest.raises(ValueError, match="models.config"):
        broken.read()


def test_docker_command_mounts_the_serving_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # make sure the binary branch is not taken
    root = tmp_path / "serving_models"
    command = docker_command(str(root / "models.config"), str(root))
    assert command.startswith("docker run")
    assert f"{root}:/models" in command
    assert "--model_config_file=/models/models.config" in command
    assert "-p 8500:8500" in command and "-p 8501:8501" in command
    # TF Serving re-reads models.config: that is how a new version is published.
    assert "--model_config_file_poll_wait_seconds=1" in command
    with pytest.raises(ValueError, match="not inside"):
        docker_command(str(tmp_path / "elsewhere.config"), str(root))


def test_container_config_rewrites_host_paths(tmp_path):
    root = tmp_path / "serving_models"
    specs = [ModelSpec("cnn", str(root / "cnn")), ModelSpec("ext", "/data/ext")]
    rewritten = container_config(specs, str(root))
    assert [s.base_path for s in rewritten] == ["/models/cnn", "/data/ext"]


def test_docker_command_for_an_object_store_root_mounts_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "")
    command = docker_command("s3://bucket/serving/models.config", "s3://bucket/serving")
    assert command.startswith("docker run")
    assert " -v " not in command
    assert "--model_config_file=s3://bucket/serving/models.config" in command
    assert "--model_config_file_poll_wait_seconds=1" in command
    # Credentials are passed through by name, never printed.
    assert "-e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY" in command
    assert "-e S3_ENDPOINT" in command


def test_container_config_keeps_uris(tmp_path):
    specs = [ModelSpec("cnn", "s3://bucket/serving/cnn", "specific", versions=[3])]
    assert container_config(specs, str(tmp_path)) == specs
