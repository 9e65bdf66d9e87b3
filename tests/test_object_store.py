"""Every converted step with its inputs and outputs on s3:// (moto's S3 server, see
tests/object_store.py), compared with the same step run on local paths.

The steps chain (ingest -> augment -> transform -> train; statistics computed locally and
uploaded -> validate; push) so each runs once on each side; the data is small (a few
hundred faces) to keep the file fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from components.synthetic import generate_csv
from pipeline import fileio
from pipeline.config import (AugmentConfig, IngestConfig, ModelConfig, PushConfig,
                             TrainConfig, TransformConfig, ValidationConfig)
from pipeline.contract import (CHECKPOINTS_DIR, DUPLICATES_FILE, EXAMPLES_PATTERN,
    HISTORY_FILE, LOGS_DIR, MODELS_CONFIG, REJECTED_DIR, REJECTED_FILE, SERVING_MODEL_DIR,
    SPLITS, TRAINING_INFO_FILE, TRANSFORM_GRAPH_DIR, TRANSFORMED_DIR)

REPO = Path(__file__).resolve().parents[1]
ROWS = 240


def records(directory: str) -> list[bytes]:
    """Every serialized record of a split directory's shards, sorted (shard order and
    boundaries depend on the runner, the records do not)."""
    files = fileio.glob(fileio.join(directory, EXAMPLES_PATTERN))
    return sorted(tf.data.TFRecordDataset(files).as_numpy_iterator()) if files else []


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
    from components.example_gen import run_example_gen

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
