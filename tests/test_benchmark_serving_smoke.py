"""benchmarks/serving.py --quick on a tiny real serving root: its structure runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from tests.serving_fixtures import push_version, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_serving_benchmark_quick(tmp_path):
    template = save_tiny_model(str(tmp_path / "template"))
    root = tmp_path / "serving_models"
    push_version(str(root / "cnn"), 3, template)
    write_model_server_config(str(root / "models.config"),
                              [ModelSpec("cnn", str(root / "cnn"))])
    out = tmp_path / "serving.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serving.py"), "--quick",
         "--serving-root", str(root), "--out", str(out), "--request-log-rates", "1.0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["machine"]["nproc"] >= 1
    assert [(m["name"], m["version"]) for m in report["models"]] == [("cnn", 3)]

    floor = report["in_process"]["cnn"]
    assert 0 < floor["latency"]["p50_ms"] <= floor["latency"]["p99_ms"]
    batch = report["settings"]["max_batch_size"]
    for key in ("throughput_batch1", f"throughput_batch{batch}"):
        assert floor[key]["images_per_s"] > 0

    assert [s["config"] for s in report["servers"]][0] == "no batching"
    assert any("--batching" in s["flags"] for s in report["servers"])
    for server in report["servers"]:
        measured = server["models"]["cnn"]
        assert measured["agrees_with_in_process"] == {"grpc": True, "rest": True}
        for protocol in ("grpc", "rest"):
            assert 0 < measured[protocol]["p50_ms"] <= measured[protocol]["p99_ms"]
            throughput = measured[protocol]["throughput"]
            assert throughput["images_per_s"] > 0 and throughput["errors"] == 0
            assert throughput["server_cores"] > 0
        if "--batching" in server["flags"]:  # read from the server's metrics endpoint
            assert 1 <= measured["grpc"]["throughput"]["mean_batch_rows"] <= batch
    echo = report["transport"]["cnn"]
    assert echo["images_per_s"] > 0 and echo["errors"] == 0
    assert echo["server_cpu_ms_per_image"] > 0 and echo["client_cpu_ms_per_image"] > 0
    bare = report["bare"]["cnn"]   # benchmarks/bare_batching_server.py, same clients
    assert bare["images_per_s"] > 0 and bare["errors"] == 0 and bare["server_cores"] > 0
    assert "| cnn (v3) | gRPC | bare Python batching server" in report["markdown"]
    assert {t["model"] for t in report["targets"]} == {"cnn"}
    ceiling = [t["transport_ceiling"] for t in report["targets"] if "transport_ceiling" in t]
    assert len(ceiling) == 1 and ceiling[0]["images_per_s"] > 0
    assert "| cnn (v3) | gRPC | no batching |" in report["markdown"]

    # Request logs at sampling rate 1.0 beside none: every logged request read back.
    [logged] = [s for s in report["servers"] if s["request_log_rate"] == 1.0]
    counted = logged["models"]["cnn"]["request_log"]
    assert counted["written"] > 0 and counted["dropped"] == counted["failed"] == 0
    assert counted["records_read"] == counted["written"] and counted["bytes"] > 0
    off, on = report["request_logs"]
    assert (off["rate"], on["rate"]) == (None, 1.0) and on["records"] == counted["written"]
    for protocol in ("grpc", "rest"):
        assert on[f"{protocol}_throughput_ratio"] > 0 and on[f"{protocol}_p50_ms"] > 0
    assert "| cnn | sampling 1 |" in report["markdown"]
    assert "images/s" in proc.stdout
