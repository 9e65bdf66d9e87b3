"""benchmarks/training_cpu.py --quick on a tiny real Transform output: every figure positive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_export import make_transform_dir

REPO = Path(__file__).resolve().parents[1]


def test_training_cpu_quick(tmp_path):
    # The Transform component's real output (transform_graph + transformed splits).
    transform_dir = make_transform_dir(str(tmp_path / "data"),
                                       {"train": 300, "validation": 28, "test": 14}, seed=4)
    out = tmp_path / "bench"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "training_cpu.py"), "--quick",
         "--transform-dir", transform_dir, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())

    assert report["quick"] is True
    assert report["input_images"] == 300
    cores = {r["cores"] for r in report["input"]}
    assert 1 in cores and report["machine"]["cpus_usable"] in cores
    for row in report["input"]:
        assert row["images"] == 300
        assert row["first_epoch_images_per_s"] > 0 and row["cached_images_per_s"] > 0
    assert report["phases"]["input_1core"]["affinity"] == [
        report["phases"]["input_1core"]["affinity"][0]]  # pinned to one CPU

    rows = {(r["model"], r["variant"]): r for r in report["training"]}
    assert set(rows) == {("cnn", ""), ("vgg16", "frozen"), ("vgg16", "trainable")}
    for row in rows.values():
        assert row["images_per_s"] > 0 and all(w > 0 for w in row["window_images_per_s"])
        assert row["trainable_params"] > 0
    assert rows[("vgg16", "frozen")]["vgg16_base_trainable"] is False
    assert rows[("vgg16", "trainable")]["vgg16_base_trainable"] is True
    # A frozen base leaves most of VGG16's weights out of training.
    assert (rows[("vgg16", "frozen")]["trainable_params"]
            < rows[("vgg16", "trainable")]["trainable_params"])

    assert len(report["ratios"]) == 3
    for ratio in report["ratios"]:
        assert ratio["cores_needed_cached"] > 0 and ratio["processes_fed_per_core"] > 0
    assert "| measurement | batch | cores | images/s |" in proc.stdout
    assert report["markdown"] in proc.stdout
