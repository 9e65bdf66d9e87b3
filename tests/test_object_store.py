"""Every converted step with its inputs and outputs on s3:// (moto's S3 server, see
tests/object_store.py), compared with the same step run on local paths.

The steps chain (ingest -> augment -> transform -> train; statistics computed locally and
uploaded -> validate; push) so each runs once on each side; the data is small (a few
hundred faces) to keep the file fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.core import fileio
from fer_pipeline.core.config import (AugmentConfig, IngestConfig, PushConfig,
                             TransformConfig, ValidationConfig)
from fer_pipeline.core.contract import (CHECKPOINTS_DIR, DUPLICATES_FILE, EXAMPLES_PATTERN,
    FEATURE_SOURCE, HISTORY_FILE, LOGS_DIR, MODELS_CONFIG, REJECTED_DIR, REJECTED_FILE, SERVING_MODEL_DIR,
    SPLITS, TRAINING_INFO_FILE, TRANSFORM_GRAPH_DIR, TRANSFORMED_DIR)

REPO = Path(__file__).resolve().parents[1]
ROWS = 240


def records(directory: str) -> list[bytes]:
    """Every serialized record of a split directory's shards, sorted (shard order and
    boundaries depend on the runner, the records do not), each `source` cut to its line."""
    files = fileio.glob(fileio.join(directory, EXAMPLES_PATTERN))
    return sorted(map(_source_line, tf.data.TFRecordDataset(files).as_numpy_iterator())
                  ) if files else []


def _source_line(record: bytes) -> bytes:
    """A record whose `source` (`path:line`) keeps only the line: the local and the S3 run
    read the same CSV under different paths."""
    example = tf.train.Example.FromString(record)
    source = example.features.feature[FEATURE_SOURCE].bytes_list.value
    assert len(source) == 1 and b".csv:" in source[0], source
    source[0] = source[0].rsplit(b":", 1)[1]
    return example.SerializeToString(deterministic=True)


def relative_files(root: str) -> list[str]:
    return [rel for rel, _ in fileio.walk_files(root)]


# ------------------------------------------------------------------------- fileio

def test_fileio_round_trips_files_and_trees(s3, tmp_path):
    root = s3.unique_uri("fileio")
    fileio.write_text(fileio.join(root, "a", "one.txt"), "one")
    fileio.write_bytes(fileio.join(root, "a", "b", "two.bin"), b"\x00\x01")
    assert fileio.read_text(fileio.join(root, "a", "one.txt")) == "one"
    assert fileio.listdir(fileio.join(root, "a")) == ["b", "one.txt"]
    assert fileio.isdir(fileio.join(root, "a", "b"))
    assert relative_files(root) == ["a/b/two.bin", "a/one.txt"]
    assert fileio.dirname(fileio.join(root, "a", "one.txt")) == fileio.join(root, "a")

    local = tmp_path / "down"
    assert fileio.copytree(root, str(local), last=("a/b/two.bin",)) == [
        "a/one.txt", "a/b/two.bin"]
    assert (local / "a" / "b" / "two.bin").read_bytes() == b"\x00\x01"
    fileio.copytree(str(local), fileio.join(root, "copy"))
    assert relative_files(fileio.join(root, "copy")) == ["a/b/two.bin", "a/one.txt"]

    fileio.rmtree(fileio.join(root, "a"))
    assert not fileio.exists(fileio.join(root, "a", "one.txt"))
    # Locally a write goes through a temp file that is renamed over the target.
    fileio.write_text(str(tmp_path / "x.json"), "{}")
    fileio.write_text(str(tmp_path / "x.json"), "[]")
    assert sorted(os.listdir(tmp_path)) == ["down", "x.json"]
    assert (tmp_path / "x.json").read_text() == "[]"


def test_fingerprint_of_an_object_equals_the_local_files(s3, tmp_path):
    from fer_pipeline.core.artifacts import fingerprint
    from fer_pipeline.core.contract import MANIFEST_FILE

    local = tmp_path / "step"
    (local / "sub").mkdir(parents=True)
    (local / "shard.tfrecord").write_bytes(os.urandom(3 << 20) + b"tail")
    (local / "sub" / "empty.txt").write_bytes(b"")
    (local / MANIFEST_FILE).write_text('{"duration_s": 1}')
    root = s3.unique_uri("fingerprint")
    fileio.copytree(str(local), root)
    fileio.write_text(fileio.join(root, MANIFEST_FILE), '{"duration_s": 2}')
    assert fingerprint(root) == fingerprint(str(local))
    shard = fileio.join(root, "shard.tfrecord")
    assert fingerprint(shard) == fingerprint(str(local / "shard.tfrecord"))
    assert fingerprint(shard) != fingerprint(root)
    with pytest.raises(FileNotFoundError, match="no such"):
        fingerprint(fileio.join(root, "missing.tfrecord"))


def test_fingerprint_streams_a_large_object_in_one_get(s3, tmp_path):
    """A 32 MiB object is hashed from one GET in 8 MiB pieces: Python never holds it whole
    (before: 128 HEADs and 128 ranged GETs of 512 KiB for 64 MiB, and the object in one
    bytes)."""
    import tracemalloc

    from fer_pipeline.core.artifacts import fingerprint

    data = os.urandom(32 << 20)
    (tmp_path / "big.tfrecord").write_bytes(data)
    uri = fileio.join(s3.unique_uri("streamed"), "big.tfrecord")
    bucket, key = uri[len("s3://"):].split("/", 1)
    # The client fingerprint uses, so botocore's service model loads outside the trace.
    fileio._s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    del data
    tracemalloc.start()
    try:
        found = fingerprint(uri)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == fingerprint(str(tmp_path / "big.tfrecord"))
    assert peak < 2 * fileio.READ_CHUNK_BYTES + (4 << 20), peak  # the object is 32 MiB
    log = s3.log_path.read_text(errors="replace")
    requests = [line for line in log.splitlines() if f"/{key} " in line]
    assert sum("GET /" in line for line in requests) == 1, requests


def test_beams_s3_filesystem_shares_one_boto3_client_per_settings(s3):
    """core/beam_job.share_s3_clients: Beam builds a client per S3 operation; ours
    reuse one boto3 client per S3 settings, each operation keeping its own Beam wrapper."""
    from apache_beam.io.aws.s3io import S3IO
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    import fer_pipeline.core.beam_job  # noqa: F401  (installs the sharing, as every Beam step does)

    options = PipelineOptions(s3.beam_args)
    first, second = S3IO(options=options), S3IO(options=options)
    assert first.client is not second.client                 # Beam's wrappers: one each
    assert first.client.client is second.client.client       # one boto3 client
    other = S3IO(options=PipelineOptions([*s3.beam_args, "--s3_region_name=eu-west-3"]))
    assert other.client.client is not first.client.client
    # And it still talks to the server: write through Beam, read back through Beam.
    uri = s3.uri("shared-client", "hello.txt")
    fileio.configure_beam_filesystems(s3.beam_args)
    with FileSystems.create(uri) as handle:
        handle.write(b"hello")
    with FileSystems.open(uri) as handle:
        assert handle.read() == b"hello"
    assert FileSystems.exists(uri)


# ------------------------------------------------------------------------- ingest

@pytest.fixture(scope="module")
def csv_paths(s3, tmp_path_factory) -> dict[str, str]:
    local = tmp_path_factory.mktemp("csv") / "fer.csv"
    generate_csv(str(local), rows=ROWS, seed=11)
    # One bad row and one image leaked into the test split, so the reports are non-empty.
    lines = local.read_text().splitlines()
    lines.append("9," + lines[1].split(",")[1] + ",Training")
    lines.append(lines[1].rsplit(",", 1)[0] + ",PrivateTest")
    local.write_text("\n".join(lines) + "\n")
    remote = s3.uri("data", "fer.csv")
    fileio.copy_file(str(local), remote)
    return {"local": str(local), "s3": remote}


@pytest.fixture(scope="module")
def ingested(s3, csv_paths, tmp_path_factory) -> dict:
    from fer_pipeline.components.example_gen import run_example_gen

    config = IngestConfig(num_shards=2)
    local_dir = str(tmp_path_factory.mktemp("local") / "examples")
    remote_dir = s3.uri("run", "examples")
    return {
        "local": run_example_gen(csv_paths["local"], local_dir, config, []),
        "s3": run_example_gen(csv_paths["s3"], remote_dir, config, s3.beam_args),
    }


def test_ingest_on_s3_writes_what_a_local_run_writes(ingested):
    local, remote = ingested["local"], ingested["s3"]
    assert remote.output_dir.startswith("s3://")
    assert remote.rows_read == local.rows_read == ROWS + 2
    assert remote.rows_written == local.rows_written
    assert sum(remote.rows_written.values()) == ROWS
    assert remote.rejected_by_reason == local.rejected_by_reason == {
        "duplicate_of_train_row": 1, "label_out_of_range": 1}
    assert remote.num_shards == local.num_shards == {split: 2 for split in SPLITS}
    for split in SPLITS:
        assert records(remote.split_dirs[split]) == records(local.split_dirs[split]), split
    for name in (f"{REJECTED_DIR}/{REJECTED_FILE}", DUPLICATES_FILE):
        assert (fileio.read_text(fileio.join(remote.output_dir, name))
                == fileio.read_text(fileio.join(local.output_dir, name))), name
    # The Beam temp reports were read back and removed.
    assert sorted(fileio.listdir(remote.output_dir)) == sorted(
        [REJECTED_DIR, DUPLICATES_FILE, *SPLITS])


def test_ingest_on_s3_of_clean_data_writes_empty_reports(s3, tmp_path):
    """No rejected rows and no duplicates: Beam must not try to write an empty object
    (S3 refuses a multipart upload without parts)."""
    from fer_pipeline.components.example_gen import run_example_gen

    local = tmp_path / "clean.csv"
    generate_csv(str(local), rows=70, seed=12)
    remote = s3.uri("data", "clean.csv")
    fileio.copy_file(str(local), remote)
    result = run_example_gen(remote, s3.unique_uri("clean/examples"), IngestConfig(),
                             s3.beam_args)
    assert (result.rows_read, result.rows_rejected, result.cross_split_duplicates) == (70, 0, 0)
    rejected = fileio.read_text(result.rejected_path).splitlines()
    assert len(rejected) == 1 and rejected[0].startswith("line_number,reason,raw_line")
    assert fileio.read_json(result.duplicates_path)["duplicates"] == []


# ------------------------------------------------------------------------- augment

@pytest.fixture(scope="module")
def augmented(s3, ingested, tmp_path_factory) -> dict:
    from fer_pipeline.components.augment import run_augment

    config = AugmentConfig(seed=3)
    local_dir = str(tmp_path_factory.mktemp("local") / "augmented")
    return {
        "local": run_augment(ingested["local"].output_dir, local_dir, config, []),
        "s3": run_augment(ingested["s3"].output_dir, s3.uri("run", "augmented"), config,
                          s3.beam_args),
    }


def test_augment_on_s3_writes_what_a_local_run_writes(augmented):
    local, remote = augmented["local"], augmented["s3"]
    assert remote.train_dir.startswith("s3://")
    assert remote.counts_after == local.counts_after
    assert remote.augmented == local.augmented > 0
    assert records(remote.train_dir) == records(local.train_dir)
    # The per-class summary the pipeline wrote was read back and removed.
    assert fileio.listdir(fileio.dirname(remote.train_dir)) == ["train"]


# ------------------------------------------------------------------------- validate

def test_validation_reads_and_writes_s3(s3, ingested, tmp_path):
    from fer_pipeline.components.statistics.executor import run_statistics
    from fer_pipeline.components.validation import DataValidationError, raise_if_blocking, run_validation

    local_stats = str(tmp_path / "statistics")
    run_statistics(ingested["local"].output_dir, None, None, local_stats, None, [])
    remote_stats = s3.uri("run", "statistics")
    fileio.copytree(local_stats, remote_stats)
    schema = str(REPO / ValidationConfig.schema_path)
    config = ValidationConfig()

    local = run_validation(local_stats, schema, str(tmp_path / "anomalies"), config)
    remote = run_validation(remote_stats, schema, s3.uri("run", "anomalies"), config)
    assert remote.report_path.startswith("s3://")
    assert remote.splits == local.splits == list(SPLITS)
    assert (remote.num_examples, remote.anomalies, remote.blocking, remote.summary) == (
        local.num_examples, local.anomalies, local.blocking, local.summary)
    assert fileio.read_json(remote.drift_path) == fileio.read_json(local.drift_path)
    assert fileio.read_text(remote.report_path) == fileio.read_text(local.report_path)
    for split in SPLITS:
        assert (fileio.read_text(remote.anomalies_paths[split])
                == fileio.read_text(local.anomalies_paths[split]))
    if remote.blocking:  # the report is read back from s3 into the error
        with pytest.raises(DataValidationError, match="Full report: s3://"):
            raise_if_blocking(remote)
    else:
        raise_if_blocking(remote)


# ------------------------------------------------------------------------- transform

@pytest.fixture(scope="module")
def transformed(s3, ingested, augmented, tmp_path_factory) -> dict:
    from fer_pipeline.components.transform import run_transform

    local_dir = str(tmp_path_factory.mktemp("local") / "transform")
    return {
        "local": run_transform(fileio.dirname(augmented["local"].train_dir),
                               ingested["local"].output_dir, local_dir, TransformConfig(), []),
        "s3": run_transform(fileio.dirname(augmented["s3"].train_dir),
                            ingested["s3"].output_dir, s3.uri("run", "transform"),
                            TransformConfig(), s3.beam_args),
    }


def test_transform_on_s3_matches_a_local_run(transformed):
    from fer_pipeline.components.transform import apply_to_pixels

    local, remote = transformed["local"], transformed["s3"]
    assert remote.transform_graph_dir.startswith("s3://")
    assert remote.counts == local.counts
    assert remote.offset == pytest.approx(local.offset, rel=1e-6)
    assert remote.scale == pytest.approx(local.scale, rel=1e-6)
    # The transform graph TFT wrote to s3 applies the same normalization when loaded from s3.
    pixels = np.random.default_rng(0).integers(0, 256, (3, 2304)).astype(np.uint8)
    np.testing.assert_allclose(apply_to_pixels(remote.transform_graph_dir, pixels),
                               apply_to_pixels(local.transform_graph_dir, pixels), rtol=1e-5,
                               atol=1e-5)
    # TFT's temp directory is gone; only the contract's two directories remain.
    root = fileio.dirname(remote.transform_graph_dir)
    assert fileio.listdir(root) == sorted([TRANSFORM_GRAPH_DIR, TRANSFORMED_DIR])


# ------------------------------------------------------------------------- train

TRAIN_OVERRIDES = {"models": {"cnn": {"batch_size": 32, "epochs": 2, "learning_rate": 1e-3,
                                      "early_stopping_patience": 2,
                                      "max_train_examples": 64}},
                   "shuffle_buffer": 200, "seed": 5}


def _train_in_subprocess(s3, transform_dir: str, output_dir: str,
                         crash_after_epoch: int = 0) -> tuple[int, str]:
    """tests/trainer_child.py in a child process (a crash exits that process); it ends
    through exit_process, cleanly after tensorflow-io's S3 filesystem was used."""
    args = json.dumps({"transform_dir": transform_dir, "output_dir": output_dir,
                       "train": TRAIN_OVERRIDES, "crash_after_epoch": crash_after_epoch,
                       "exit_process": True})
    env = dict(os.environ)
    env.update(s3.env, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "tests.trainer_child", args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    return done.returncode, done.stdout


def test_training_on_s3_uploads_checkpoints_and_resumes_after_a_kill(s3, transformed):
    from fer_pipeline.components.trainer.executor import (BACKUP_METADATA_FILE, BEST_WEIGHTS_FILE,
                                     CSV_LOG_FILE)
    from tests.trainer_child import CRASH_EXIT_CODE

    transform_dir = fileio.dirname(transformed["s3"].transform_graph_dir)
    output = s3.unique_uri("models/cnn")
    code, log = _train_in_subprocess(s3, transform_dir, output, crash_after_epoch=1)
    assert code == CRASH_EXIT_CODE, log
    # Epoch 1's checkpoint reached the bucket before the process died.
    checkpoints = fileio.join(output, CHECKPOINTS_DIR)
    assert fileio.read_json(fileio.join(checkpoints, BACKUP_METADATA_FILE))["epoch"] == 1
    assert fileio.exists(fileio.join(checkpoints, BEST_WEIGHTS_FILE))
    assert not fileio.exists(fileio.join(output, SERVING_MODEL_DIR))

    code, log = _train_in_subprocess(s3, transform_dir, output)
    assert code == 0, log
    assert "Epoch 1/2" not in log and "Epoch 2/2" in log
    history = fileio.read_json(fileio.join(output, HISTORY_FILE))
    assert history["resumed_at_epoch"] == 2
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    info = fileio.read_json(fileio.join(output, TRAINING_INFO_FILE))
    assert info["train_examples"] == 64 and info["transform_dir"] == transform_dir
    assert len(fileio.read_text(fileio.join(output, CSV_LOG_FILE)).splitlines()) == 3
    assert any("events.out.tfevents" in rel for rel in relative_files(
        fileio.join(output, LOGS_DIR)))
    # A finished run leaves no checkpoint to resume from, on s3 as locally.
    assert not fileio.exists(checkpoints)

    # The SavedModel, written locally and uploaded, loads from s3 and serves.
    served = tf.saved_model.load(fileio.join(output, SERVING_MODEL_DIR))
    out = served.signatures["serving_uint8"](pixels=tf.zeros([2, 48, 48], tf.uint8))
    assert out["probabilities"].shape == (2, 7)


# ------------------------------------------------------------------------- push

@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> dict[str, str]:
    """Three "retrained" versions of one small real SavedModel (files differ, model same)."""
    from tests.test_evaluator import make_model_dir
    from tests.test_pusher import model_dir

    root = tmp_path_factory.mktemp("candidates")
    make_model_dir(root / "built", "good")
    return {f"run{i}": model_dir(root / "built", root, "good", f"run{i}", f"run {i}")
            for i in range(3)}


def _bless(tmp_path: Path) -> str:
    from tests.test_pusher import bless

    return bless(tmp_path / "evaluation", {"cnn": True})


def test_push_to_s3_publishes_through_models_config(s3, candidates, tmp_path):
    from fer_pipeline.components.pusher import latest_served_version, run_pusher, served_versions
    from fer_pipeline.core.serving_root import read_model_server_config

    evaluation = _bless(tmp_path)
    remote_root, local_root = s3.unique_uri("serving"), str(tmp_path / "serving")
    config = PushConfig(keep_versions=2)
    for i in range(3):
        remote = run_pusher({"cnn": candidates[f"run{i}"]}, evaluation, None, remote_root,
                            s3.uri("push", f"r{i}"), config)
        local = run_pusher({"cnn": candidates[f"run{i}"]}, evaluation, None, local_root,
                           str(tmp_path / f"push{i}"), config)
        assert remote.models["cnn"].version == local.models["cnn"].version == i + 1
        assert remote.models["cnn"].removed_versions == local.models["cnn"].removed_versions
    assert remote.models["cnn"].removed_versions == [1]

    specs = read_model_server_config(fileio.join(remote_root, MODELS_CONFIG))
    assert [(s.name, s.base_path, s.version_policy, s.versions) for s in specs] == [
        ("cnn", fileio.join(remote_root, "cnn"), "specific", [2, 3])]
    assert remote.models_config == fileio.join(remote_root, MODELS_CONFIG)
    assert served_versions(remote_root, "cnn") == [2, 3]
    assert latest_served_version(remote_root, "cnn") == (3, fileio.join(remote_root, "cnn", "3"))
    # The same files in the same layout as the local root; the push record is on s3.
    assert relative_files(fileio.join(remote_root, "cnn")) == relative_files(
        fileio.join(local_root, "cnn"))
    assert fileio.read_json(remote.push_json)["models"]["cnn"]["version"] == 3
    assert "--model_config_file=" + remote.models_config in remote.tfserving_command
    assert "--model_config_file_poll_wait_seconds=" in remote.tfserving_command
    loaded = tf.saved_model.load(fileio.join(remote_root, "cnn", "3"))
    assert loaded.signatures["serving_default"](
        pixels=tf.zeros([1, 48, 48], tf.int32))["probabilities"].shape == (1, 7)

    # Pushing the served model again publishes nothing.
    again = run_pusher({"cnn": candidates["run2"]}, evaluation, None, remote_root,
                       s3.uri("push", "again"), config)
    assert not again.models["cnn"].pushed
    assert again.models["cnn"].reasons[0] == "identical to served version 3"
    assert served_versions(remote_root, "cnn") == [2, 3]


def test_push_to_s3_crashing_mid_upload_never_names_the_partial_version(
        s3, candidates, tmp_path, monkeypatch):
    from fer_pipeline.components.pusher import run_pusher, served_versions, version_dirs
    from tests.test_pusher import fail_copy_after
    from fer_pipeline.core.serving_root import read_model_server_config

    evaluation = _bless(tmp_path)
    root = s3.unique_uri("serving")
    assert run_pusher({"cnn": candidates["run0"]}, evaluation, None, root, s3.uri("push", "c0"),
                      PushConfig()).models["cnn"].version == 1

    copied = fail_copy_after(monkeypatch, 2, "connection reset (injected)")
    with pytest.raises(OSError, match="injected"):
        run_pusher({"cnn": candidates["run1"]}, evaluation, None, root, s3.uri("push", "c1"),
                   PushConfig())
    assert len(copied) == 2 and all("/cnn/2/" in path for path in copied)
    # Two objects of version 2 are in the bucket, but models.config names version 1 only.
    assert version_dirs(root, "cnn") == [1, 2]
    specs = read_model_server_config(fileio.join(root, MODELS_CONFIG))
    assert [(s.name, s.versions) for s in specs] == [("cnn", [1])]
    assert served_versions(root, "cnn") == [1]

    monkeypatch.undo()                           # the real copy again
    result = run_pusher({"cnn": candidates["run1"]}, evaluation, None, root, s3.uri("push", "c2"),
                        PushConfig())
    outcome = result.models["cnn"]
    assert outcome.version == 3 and outcome.removed_leftovers == [2]   # 2 is never reused
    assert version_dirs(root, "cnn") == [1, 3]
    assert served_versions(root, "cnn") == [1, 3]
