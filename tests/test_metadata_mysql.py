"""ML Metadata on a real MySQL-protocol server: MariaDB on 127.0.0.1 (tests/mariadb.py).

Two runs of the same small CSV share one MySQL-backed store, as runs on a cluster do: a
whole pipeline run under one run root and an ingest-only run under a second run root.

Cheap on purpose: the store is under test, not the model. The gate only pushes a model that
reaches the test split's majority-class baseline, and the CNN needs hundreds of steps to
beat it on a mixed CSV; on a CSV of one class ("happy", 100 rows) the baseline is that class
and two short epochs learn it. Validation rightly flags the six missing classes, so the run
allows anomalies; the CNN is the only model. The step cache and `fer-pipeline lineage`
must answer from MySQL (no SQLite file appears anywhere), and each store failure a user
can cause (a wrong or missing password, a server that is down or does not answer) must
end in one line of ours, quickly, before anything is created.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.core.artifacts import fingerprint, read_commit
from fer_pipeline.core.config import PipelineConfig, load_config
from fer_pipeline.pipeline.metadata import (MetadataStore, MetadataStoreError, check_mysql_server,
                               mysql_location)
from fer_pipeline.pipeline.runner import RunContext, committed_output, run_pipeline
from fer_pipeline.core.net import free_port
from tests.mariadb import PASSWORD_ENV, MariaDB, mariadb  # noqa: F401 (fixture)

BIN = os.path.dirname(sys.executable)
ROWS = 400                 # drawn, of which the "happy" quarter is kept
HAPPY = "3"
MODELS = ("cnn",)
OVERRIDES = {
    "validation": {"allow_anomalies": True},
    "infra_validation": {"mode": "load_only"},
    "train": {"models": {"cnn": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2,
                                 "max_train_examples": 0}}},
    "evaluation": {"min_accuracy": {"cnn": 0.0}, "baseline_margin": 0.0},
}
# A store that cannot be opened must say so long before this.
FAILURE_DEADLINE_S = 30


@dataclass
class SharedStore:
    server: MariaDB
    database: str
    config: PipelineConfig
    data_csv: str
    first_root: str            # the whole pipeline ran here


def _config(server: MariaDB, database: str) -> PipelineConfig:
    return load_config(profile="smoke", overrides={
        **OVERRIDES, "metadata": server.metadata_overrides(database)})


@contextlib.contextmanager
def _password(value: str | None):
    with pytest.MonkeyPatch.context() as patch:
        if value is None:
            patch.delenv(PASSWORD_ENV, raising=False)
        else:
            patch.setenv(PASSWORD_ENV, value)
        yield


def _one_class_csv(path: Path) -> str:
    """A FER-2013 CSV of the "happy" rows of a synthetic one (Usage column kept)."""
    drawn = path.with_name("drawn.csv")
    generate_csv(str(drawn), rows=ROWS, seed=5)
    with open(drawn, newline="") as source, open(path, "w", newline="") as out:
        rows = csv.reader(source)
        writer = csv.writer(out)
        writer.writerow(next(rows))
        writer.writerows(row for row in rows if row[0] == HAPPY)
    return str(path)


def _sqlite_files(root: str) -> list[Path]:
    return sorted(Path(root).rglob("*.sqlite"))


def _databases(server: MariaDB) -> set[str]:
    return set(server.sql("SHOW DATABASES").split())


@pytest.fixture(scope="module")
def shared(mariadb, tmp_path_factory) -> SharedStore:  # noqa: F811 (the fixture)
    base = tmp_path_factory.mktemp("mysql_runs")
    data_csv = _one_class_csv(base / "fer.csv")
    database = mariadb.unique_database("pipeline")
    config = _config(mariadb, database)
    first_root = str(base / "first")
    with _password(mariadb.password):
        run_pipeline(RunContext([data_csv], first_root, config, models=MODELS,
                                run_id="first"))
    return SharedStore(mariadb, database, config, data_csv, first_root)


def _lineage_cli(shared: SharedStore, tmp_path: Path, password: str | None,
                 *args: str) -> subprocess.CompletedProcess:
    config_file = tmp_path / "metadata.yaml"
    config_file.write_text(yaml.safe_dump(
        {"metadata": shared.server.metadata_overrides(shared.database)}))
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    if password is not None:
        env[PASSWORD_ENV] = password
    return subprocess.run([f"{BIN}/fer-pipeline", "lineage", "--output", shared.first_root,
                           "--config", str(config_file), *args],
                          capture_output=True, text=True, env=env, timeout=300)


# ----------------------------------------------------------------------------- two runs

def test_a_second_run_root_shares_the_store_and_the_cache_answers_from_mysql(shared,
                                                                             tmp_path):
    server = shared.server
    assert shared.database in _databases(server)      # ml-metadata created it
    assert _sqlite_files(shared.first_root) == []
    with _password(server.password):
        # The whole pipeline again over the first run root: everything comes from the cache.
        again = run_pipeline(RunContext([shared.data_csv], shared.first_root, shared.config,
                                        models=MODELS, run_id="again"))
        assert [o.step for o in again if not o.skipped] == []

        # The same data under a second run root: its ingest is new there, so it runs and is
        # recorded beside the first run's; run again, the store says it is done.
        second_root = str(tmp_path / "second")
        ctx = RunContext([shared.data_csv], second_root, shared.config, run_id="second")
        [first_try] = run_pipeline(ctx, ["ingest"])
        [second_try] = run_pipeline(ctx, ["ingest"])
        assert (first_try.skipped, second_try.skipped) == (False, True)

        # The cache's "done" came from MySQL: the same run root against an empty database
        # of the same server re-runs the step.
        empty = _config(server, server.unique_database("empty"))
        [elsewhere] = run_pipeline(RunContext([shared.data_csv], second_root, empty,
                                              run_id="empty"), ["ingest"])
        assert not elsewhere.skipped

        store = MetadataStore(shared.config.metadata, second_root)
    assert store.location == mysql_location(shared.config.metadata)
    assert _sqlite_files(shared.first_root) == _sqlite_files(second_root) == []
    runs = set(store.run_contexts())
    assert {"fer-pipeline/first", "fer-pipeline/second"} <= runs
    assert "fer-pipeline/empty" not in runs
    ingests = {e["properties"]["execution_dir"]: e["properties"]["cache_key"]
               for run in ("fer-pipeline/first", "fer-pipeline/second")
               for e in store.executions_in_run(run) if e["step"] == "ingest"}
    assert ingests == {
        read_commit(os.path.join(shared.first_root, "examples")).uri: first_try.commit.cache_key,
        first_try.uri: first_try.commit.cache_key}
    assert [(p["model"], p["version"]) for p in store.pushed_versions()] == [("cnn", 1)]


def test_lineage_of_a_served_version_is_read_from_mysql(shared, tmp_path):
    done = _lineage_cli(shared, tmp_path, shared.server.password,
                        "--model", "cnn", "--version", "1", "--json")
    assert done.returncode == 0, done.stderr
    [found] = json.loads(done.stdout)
    assert found["data"] == [{"uri": os.path.abspath(shared.data_csv),
                              "fingerprint": fingerprint(shared.data_csv)}]
    assert found["served_path"] == os.path.join(shared.first_root, "serving_models", "cnn", "1")
    assert found["fingerprint"] == fingerprint(found["served_path"])
    assert found["transform"]["execution_dir"] == committed_output(shared.first_root,
                                                                   "transform")
    assert found["blessing"]["blessed"] is True
    assert _sqlite_files(shared.first_root) == []


# ----------------------------------------------------------------------------- failures

def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "mysql_real_connect" not in done.stderr and "MySQL 8.0" not in done.stderr
    return lines[0]


def test_a_wrong_password_is_one_line_of_ours(shared, tmp_path):
    started = time.monotonic()
    line = _one_error_line(_lineage_cli(shared, tmp_path, "not-the-password"))
    assert "error: " in line and line.endswith(
        f"the MySQL metadata store at 127.0.0.1:{shared.server.port} refused user 'fer': "
        f"wrong password in ${PASSWORD_ENV}, or the user may not connect from this host")
    assert time.monotonic() - started < FAILURE_DEADLINE_S + 60   # + the CLI's start-up


def test_a_run_that_cannot_open_its_store_creates_nothing(shared, tmp_path):
    server = shared.server
    database = server.unique_database("refused")
    config = _config(server, database)
    down = load_config(profile="smoke", overrides={"metadata": {
        **server.metadata_overrides(database), "mysql_port": free_port()}})
    cases = [(server.password + "x", config, "wrong password in $" + PASSWORD_ENV),
             (None, config, f"${PASSWORD_ENV} is not set"),
             (server.password, down, "Connection refused (is the server running?")]
    for password, case_config, expected in cases:
        run_root = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        started = time.monotonic()
        with _password(password), pytest.raises(MetadataStoreError) as raised:
            run_pipeline(RunContext([shared.data_csv], str(run_root), case_config))
        assert time.monotonic() - started < FAILURE_DEADLINE_S
        assert expected in str(raised.value) and "\n" not in str(raised.value)
        assert not run_root.exists()
    assert database not in _databases(server)


def test_a_server_that_accepts_but_never_answers_times_out(tmp_path):
    config = load_config(profile="smoke").metadata
    with socket.socket() as silent:     # the kernel completes the TCP handshake; no greeting
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        config.mysql_host, config.mysql_port = silent.getsockname()
        started = time.monotonic()
        with pytest.raises(MetadataStoreError, match=r"did not answer within 0\.5 s"):
            check_mysql_server(config, timeout_s=0.5)
        assert time.monotonic() - started < 5


def test_make_mysql_up_and_down_serve_the_user_and_port_the_readme_shows(tmp_path):
    """What `make mysql-up` / `make mysql-down` run (the Makefile passes DIR and --port)."""
    from tests.mariadb import installed

    if not installed():
        pytest.skip("no MariaDB server: install Debian's mariadb-server")
    port = free_port()
    env = {**os.environ, PASSWORD_ENV: "try-it"}
    command = [sys.executable, "-m", "tests.mariadb"]
    cwd = Path(__file__).resolve().parents[1]
    up = subprocess.run([*command, "up", str(tmp_path / "db"), "--port", str(port)], env=env,
                        cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert f"mysql_port: {port}" in up.stdout and "mysql_user: fer" in up.stdout
        config = load_config(overrides={"metadata": {
            "mysql_host": "127.0.0.1", "mysql_port": port, "mysql_user": "fer",
            "mysql_database": "fer_metadata"}}).metadata
        with _password("try-it"):
            assert MetadataStore(config, str(tmp_path / "run")).run_contexts() == []
    finally:
        down = subprocess.run([*command, "down", str(tmp_path / "db")], cwd=cwd,
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    with pytest.raises(MetadataStoreError, match="Connection refused"):
        check_mysql_server(config)


def test_localhost_means_the_default_unix_socket_and_its_failure_says_so(tmp_path):
    """No TCP greeting is read for "localhost" (the client library uses a socket there)."""
    config = load_config(overrides={"metadata": {
        "mysql_host": "localhost", "mysql_port": free_port(), "mysql_user": "fer",
        "mysql_database": "fer_nowhere"}}).metadata
    with _password("any"), pytest.raises(MetadataStoreError,
                                         match="default Unix socket.*127.0.0.1"):
        MetadataStore(config, str(tmp_path / "run"))
