"""The request log's bounds (serving/request_log_bounds.py): the writer's queue in bytes, and
each log directory in total size and age, oldest files deleted first and counted on the
server's /monitoring/prometheus/metrics. Real writers, real files, a real server."""
from __future__ import annotations

import http.client
import os
import time

from fer_pipeline.core.serving_root import ModelSpec, RequestLogSpec, write_model_server_config
from fer_pipeline.serving.request_log import (LOG_SUFFIX, OPEN_SUFFIX, RequestLogConfig,
                                              RequestLogger, log_files, read_logs)
from fer_pipeline.serving.server import FerServer, ServerConfig
from tests.serving_fixtures import push_version, save_tiny_model
from tests.test_request_log import log_arrays, logged_tags, metrics, rest_predict, tagged_image

RECORD_BYTES = 48 * 48 + 8    # what the queue counts for one log_arrays record


def test_queue_is_bounded_in_bytes(tmp_path):
    spec = RequestLogSpec(str(tmp_path / "cnn" / "requests"))
    logger = RequestLogger(lambda name: spec, RequestLogConfig(queue_bytes=4 * RECORD_BYTES))
    log_arrays(logger, 10)     # the writer is not running yet: 4 records' bytes fit
    assert logger.queued() == 4 and logger.counts()["cnn"].dropped == 6
    lines = logger.prometheus_lines()
    assert f"fer_serve_request_log_queue_bytes {4 * RECORD_BYTES}" in lines
    assert 'fer_serve_request_log_dropped_total{model_name="cnn"} 6' in lines
    logger.start().stop()
    assert logger.counts()["cnn"].written == 4
    assert "fer_serve_request_log_queue_bytes 0" in logger.prometheus_lines()
    assert [index for _, index in logged_tags(list(read_logs(str(tmp_path))))] == [0, 1, 2, 3]


def test_directory_is_pruned_by_total_size_oldest_first(tmp_path):
    spec = RequestLogSpec(str(tmp_path / "cnn" / "requests"))
    logger = RequestLogger(lambda name: spec, RequestLogConfig(
        max_file_bytes=5_000, max_total_bytes=16_000)).start()
    log_arrays(logger, 30)     # ~2.4 kB each: a file of ~7 kB every third record
    logger.stop()
    files = log_files(str(tmp_path / "cnn"))
    assert sum(os.path.getsize(f) for f in files) <= 16_000
    kept = [index for _, index in logged_tags(list(read_logs(files)))]
    assert kept and kept == list(range(30 - len(kept), 30)), kept   # the newest survive
    directory = str(tmp_path / "cnn")
    deleted = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
               for line in logger.prometheus_lines() if "_deleted_" in line
               and not line.startswith("#")}
    assert deleted[f'fer_serve_request_log_deleted_files_total{{directory="{directory}"}}'] >= 5
    written = sum(os.path.getsize(f) for f in files) + deleted[
        f'fer_serve_request_log_deleted_bytes_total{{directory="{directory}"}}']
    assert 30 * 2_300 < written < 30 * 2_600


def test_files_older_than_max_age_are_deleted_and_others_kept(tmp_path):
    directory = tmp_path / "cnn"
    directory.mkdir()
    old, old_open, notes = (directory / ("requests-old" + LOG_SUFFIX),
                            directory / ("requests-other-server" + OPEN_SUFFIX),
                            directory / "notes.txt")
    for path in (old, old_open, notes):
        path.write_bytes(b"x" * 100)
        two_days_ago = time.time() - 2 * 86400
        os.utime(path, (two_days_ago, two_days_ago))
    spec = RequestLogSpec(str(directory / "requests"))
    logger = RequestLogger(lambda name: spec, RequestLogConfig(max_age_s=3600)).start()
    log_arrays(logger, 1)
    logger.stop()
    # Closed and old: deleted. Another server's open file and foreign files: kept.
    assert not old.exists() and old_open.exists() and notes.exists()
    assert len(list(directory.glob("*" + LOG_SUFFIX))) == 1
    assert f'fer_serve_request_log_deleted_bytes_total{{directory="{directory}"}} 100' in \
        logger.prometheus_lines()


def test_server_counts_deletions_on_its_metrics_page(tmp_path):
    push_version(str(tmp_path / "cnn"), 1, save_tiny_model(str(tmp_path / "template")))
    logs = tmp_path / "logs" / "cnn"
    config = write_model_server_config(str(tmp_path / "models.config"), [
        ModelSpec("cnn", str(tmp_path / "cnn"),
                  request_log=RequestLogSpec(str(logs / "requests"), 1.0))])
    server = FerServer(ServerConfig(config, port=0, rest_port=0, request_log=RequestLogConfig(
        max_file_bytes=3_000, max_total_bytes=8_000))).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        for index in range(12):
            assert rest_predict(connection, tagged_image(1, index))[0] == 200
        connection.close()
        key = f'fer_serve_request_log_deleted_files_total{{directory="{logs}"}}'
        deadline = time.monotonic() + 30
        while metrics(server.rest_port).get(key, 0) < 1:
            assert time.monotonic() < deadline, metrics(server.rest_port)
            time.sleep(0.05)
    finally:
        server.stop()
    assert sum(os.path.getsize(f) for f in log_files(str(logs))) <= 8_000
