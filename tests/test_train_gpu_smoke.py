"""benchmarks/train_gpu.py --smoke: the GPU benchmark's structure runs on CPU under TF Keras."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_gpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_gpu.py"), "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert report["versions"]["backend"] == "tensorflow"
    assert "synthetic" in report["data"]["description"]
    assert report["data"]["sizes"]["train"] > 0
    assert report["data"]["normalization"]["std"] > 0
    custom = [r for r in report["throughput"] if r["loop"] == "custom"]
    fit = [r for r in report["throughput"] if r["loop"] == "fit"]
    for model in ("cnn", "vgg16"):
        rows = [r for r in custom if r["model"] == model]
        assert rows and all(r["images_per_s"] > 0 for r in rows), rows
        assert any(r["model"] == model and r["images_per_s"] > 0 for r in fit)
        sched = [s for s in report["schedules"] if s["model"] == model]
        assert sched, report["schedules"]
        for s in sched:
            assert 0.0 <= s["test_accuracy"] <= 1.0
            assert 0.0 <= s["val_accuracy"] <= 1.0
            assert s["wall_s"] >= s["train_s"] > 0
            assert s["epochs"] >= 1 and s["images_per_epoch"] > 0
    assert "torch_skipped" in report  # no torch here
    assert "| images/s |" in report["markdown"]
    assert "images/s" in proc.stdout
