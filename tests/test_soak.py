"""benchmarks/soak.py for 60 s on a tiny real model: the soak's invariants (no request lost,
request logs complete, threads and memory flat, no traceback), never its times."""
from __future__ import annotations

from benchmarks.soak import run_soak
from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
from tests.serving_fixtures import push_version, save_tiny_model


def test_a_minute_of_soak_keeps_its_invariants(tmp_path):
    root = tmp_path / "serving_models"
    push_version(str(root / "cnn"), 1, save_tiny_model(str(tmp_path / "template")))
    write_model_server_config(str(root / "models.config"), [ModelSpec("cnn", str(root / "cnn"))])
    # Capped at 60 requests/s: the invariants need traffic of every kind, not a busy
    # machine (the suite shares it); 10 % slow clients and 5 % disconnects.
    report = run_soak(str(root), "cnn", 60.0, window_s=10.0, capacity_s=3.0, max_rate=60.0,
                      clients=8, slow_share=0.1, disconnect_share=0.05, slow_pause_s=0.5,
                      rest_read_timeout_s=2.0)
    kinds = report["kinds"]
    assert all(kinds.get(kind, 0) > 0 for kind in ("grpc", "rest", "slow", "slow_never",
                                                   "disconnect")), kinds
    assert report["lost"] == {}, report["codes"]
    assert report["accounted"] == report["sent"]   # answers + sheds + 408s + hang-ups
    assert report["codes"].get("slow_never:408", 0) == kinds["slow_never"]
    assert report["request_logs_complete"], (report["request_log_records"], report["codes"])
    assert report["tracebacks_in_server_log"] == 0
    assert len(report["windows"]) == 6
    assert report["threads_ratio_max"] <= 1.1 and report["rss_ratio_max"] <= 1.1, \
        report["windows"]
