"""The Beam steps on real engines: a Flink cluster and a Spark cluster on 127.0.0.1, and
Dataflow's offline translation.

Clusters (tests/engine_fixtures.py): Flink 1.19 (a JobManager and a TaskManager, separate
processes) and Spark 3.2.2 standalone (a Master and a Worker), each with Beam's job server
(one long-running process per cluster) and a Python SDK worker pool; one cluster at a
time, each started once. The data half (ingest, augment, statistics, transform) runs on
each with parallelism 2 on a small dirty CSV (bad rows and a cross-split duplicate),
through the CLI exactly as the README shows, and every output must equal the DirectRunner's
on the same CSV: examples per split and the augmented training split by content
(order-free), rejected rows with line numbers and reasons, the duplicates report, TFDV
statistics (counts, histograms), TFT's mean and std. On Flink the run goes on from those
outputs to a pushed CNN, bulk inference with it runs on Flink too, and a TaskManager killed
mid-job must end the step with one line naming Flink and the cause, leaving the committed
output in force.

Dataflow cannot run here; what can be checked offline is that it translates every Beam
step, through the Kubeflow component that runs it, with --dataflow_endpoint=http://localhost:1
--no_auth --template_location, and that the staged pipeline proto holds our transforms.

Select these with `pytest -m engines`; `make test` runs them (after `make engines`).
"""
from __future__ import annotations

import glob
import ipaddress
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from fer_pipeline.components.transform import read_normalization
from tools import local_cluster
from fer_pipeline.core.artifacts import read_commit
from fer_pipeline.core.beam_job import BeamJobNotRun, describe_failure
from fer_pipeline.core.net import free_port
from fer_pipeline.components.bulk_inferrer import csv_rows, prediction_order, read_committed
from fer_pipeline.components.bulk_inferrer.outputs import shard_pattern
from fer_pipeline.core.contract import (DUPLICATES_FILE, PREDICTION_LOGS_DIR, REJECTED_DIR,
                                        REJECTED_FILE, SPLITS)
from fer_pipeline.pipeline.dag import build_steps
from fer_pipeline.pipeline.kfp_pipeline import run_component
from tests import engine_fixtures
from tests.engine_fixtures import ENGINE_ROWS, EngineData, EngineRun, run_cli

pytestmark = pytest.mark.engines

# The module's fixtures (tests/engine_fixtures.py).
engine_data = engine_fixtures.engine_data
cluster = engine_fixtures.cluster
engine_run = engine_fixtures.engine_run

# The Flink-only tests take the module's Flink cluster: overriding `cluster`'s parameters
# with ["flink"] (index 0, as in ENGINES) lets pytest group them with the other Flink tests
# on the same cluster instead of starting another.
only_on_flink = pytest.mark.parametrize("cluster", ["flink"], indirect=True)


def _committed(run_root: str, step_dir: str) -> Path:
    commit = read_commit(str(Path(run_root) / step_dir))
    assert commit is not None, f"no committed {step_dir} under {run_root}"
    return Path(commit.uri)


def _records(pattern: Path) -> list[bytes]:
    files = sorted(str(p) for p in pattern.parent.glob(pattern.name))
    assert files, f"nothing matches {pattern}"
    return sorted(record.numpy() for record in tf.data.TFRecordDataset(files))


# ----------------------------------------------------------------------------- equal results

def test_examples_per_split_equal_the_direct_runners(engine_run: EngineRun,
                                                    engine_data: EngineData):
    engine, root, direct = engine_run.engine, engine_run.root, engine_data.direct_run
    for split in SPLITS:
        pattern = Path("examples-*.tfrecord")
        ours = _records(_committed(root, "examples") / split / pattern)
        theirs = _records(_committed(direct, "examples") / split / pattern)
        assert len(ours) == len(theirs) and ours == theirs, f"{engine}: {split} differs"


def test_rejected_rows_and_duplicates_equal_the_direct_runners(engine_run: EngineRun,
                                                              engine_data: EngineData):
    engine, root, direct = engine_run.engine, engine_run.root, engine_data.direct_run
    ours, theirs = _committed(root, "examples"), _committed(direct, "examples")
    rejected = (ours / REJECTED_DIR / REJECTED_FILE).read_text()
    assert rejected == (theirs / REJECTED_DIR / REJECTED_FILE).read_text(), engine
    for line in [*engine_data.bad_lines, engine_data.leaked_line]:
        assert f"\n{line}," in rejected, f"{engine}: line {line} not among the rejected rows"
    duplicates = json.loads((ours / DUPLICATES_FILE).read_text())
    assert duplicates == json.loads((theirs / DUPLICATES_FILE).read_text()), engine
    assert duplicates["cross_split_duplicate_images"] >= 1


def test_augmented_images_equal_the_direct_runners(engine_run: EngineRun,
                                                   engine_data: EngineData):
    engine, root, direct = engine_run.engine, engine_run.root, engine_data.direct_run
    pattern = Path("train") / "examples-*.tfrecord"
    ours = _records(_committed(root, "augmented") / pattern)
    assert ours == _records(_committed(direct, "augmented") / pattern), engine


def _statistics_view(stats) -> dict:
    """What must be equal: counts and histograms per feature (float values to 1e-9 relative:
    the engines add the same numbers in another order)."""
    dataset = stats.datasets[0]
    view = {"num_examples": dataset.num_examples}
    for feature in dataset.features:
        name = ".".join(feature.path.step)
        common = (feature.num_stats.common_stats if feature.HasField("num_stats")
                  else feature.string_stats.common_stats)
        entry = {"non_missing": common.num_non_missing, "missing": common.num_missing,
                 "values": (common.min_num_values, common.max_num_values),
                 "total_values": common.tot_num_values}
        if feature.HasField("num_stats"):
            numbers = feature.num_stats
            entry["zeros"] = numbers.num_zeros
            entry["min_max"] = (numbers.min, numbers.max)
            entry["mean_std"] = (pytest.approx(numbers.mean, rel=1e-9),
                                 pytest.approx(numbers.std_dev, rel=1e-9))
            entry["histograms"] = [
                (h.type, [(pytest.approx(b.low_value, rel=1e-9),
                           pytest.approx(b.high_value, rel=1e-9),
                           pytest.approx(b.sample_count, rel=1e-9)) for b in h.buckets])
                for h in numbers.histograms]
        else:
            entry["unique"] = feature.string_stats.unique
            entry["top"] = sorted((v.value, v.frequency) for v in feature.string_stats.top_values)
        view[name] = entry
    return view


def test_tfdv_statistics_equal_the_direct_runners(engine_run: EngineRun,
                                                  engine_data: EngineData):
    engine, root, direct = engine_run.engine, engine_run.root, engine_data.direct_run
    ours, theirs = _committed(root, "statistics"), _committed(direct, "statistics")
    for split in [*SPLITS, "augmented/train"]:
        mine = tfdv.load_statistics(str(ours / split / "stats.tfrecord"))
        reference = tfdv.load_statistics(str(theirs / split / "stats.tfrecord"))
        assert _statistics_view(mine) == _statistics_view(reference), f"{engine}: {split}"


def test_tft_mean_and_std_equal_the_direct_runners(engine_run: EngineRun,
                                                   engine_data: EngineData):
    engine, root, direct = engine_run.engine, engine_run.root, engine_data.direct_run
    ours = read_normalization(str(_committed(root, "transform") / "transform_graph"))
    theirs = read_normalization(str(_committed(direct, "transform") / "transform_graph"))
    assert ours == pytest.approx(theirs, abs=1e-6), engine
    counts = json.loads((_committed(root, "transform") / "manifest.json").read_text())
    reference = json.loads((_committed(direct, "transform") / "manifest.json").read_text())
    assert counts["result"]["counts"] == reference["result"]["counts"], engine


@only_on_flink
def test_flink_run_goes_on_to_a_pushed_model(engine_run: EngineRun):
    push = json.loads((_committed(engine_run.root, "push") / "manifest.json").read_text())
    cnn = push["result"]["models"]["cnn"]
    assert cnn["pushed"], cnn
    assert (Path(cnn["path"]) / "saved_model.pb").exists()


@only_on_flink
def test_bulk_inference_on_flink_equals_the_direct_runners(engine_run: EngineRun,
                                                           engine_data: EngineData, tmp_path):
    """`fer-pipeline infer` takes the data steps' Beam flags: on Flink (parallelism 2) it
    scores the dirty CSV with the CNN the Flink run pushed as the DirectRunner does."""
    serving_root = str(Path(engine_run.root) / "serving_models")
    outputs = {}
    for runner, flags in (("flink", engine_run.cluster.beam_args(parallelism=2)),
                          ("direct", [])):
        outputs[runner] = tmp_path / runner
        assert run_cli(["infer", "--data", engine_data.csv, "--output", str(outputs[runner]),
                        "--serving-root", serving_root, "--models", "cnn", *flags]) == 0, runner
    committed = {r: read_committed(str(outputs[r])).uri for r in ("flink", "direct")}
    flink, direct = (sorted(csv_rows(shard_pattern(committed[r], "predictions")),
                            key=prediction_order) for r in ("flink", "direct"))
    assert len(glob.glob(shard_pattern(committed["flink"], "predictions"))) >= 1
    assert len(flink) == len(direct) > ENGINE_ROWS // 2
    for ours, theirs in zip(flink, direct):
        numbers = [k for k in ours if k.endswith("confidence")]
        assert {k: v for k, v in ours.items() if k not in numbers} == \
            {k: v for k, v in theirs.items() if k not in numbers}
        for key in numbers:   # batches differ between runners: float sums in another order
            assert float(ours[key]) == pytest.approx(float(theirs[key]), abs=1e-5), key
    rejected = {r: sorted(tuple(row.values()) for row in csv_rows(
        shard_pattern(committed[r], "rejected"))) for r in ("flink", "direct")}
    assert rejected["flink"] == rejected["direct"] and rejected["flink"]
    logs = Path(committed["flink"], PREDICTION_LOGS_DIR, "cnn") / "prediction_logs-*.tfrecord"
    assert len(_records(logs)) == len(flink)
    # The driver's summary: counts from each engine's Beam metrics.
    summaries = [{k: v for k, v in json.loads(Path(committed[r], "inference.json").read_text())
                  .items() if k in ("inputs_read", "faces_scored", "rejected", "decisions")}
                 for r in ("flink", "direct")]
    assert summaries[0] == summaries[1] and summaries[0]["faces_scored"] == len(flink)


# ----------------------------------------------------------------------------- faults

@only_on_flink
def test_taskmanager_killed_mid_job_fails_the_step_in_one_line(engine_run: EngineRun,
                                                               tmp_path, capsys):
    """Kill Flink's TaskManager while `statistics` runs: the step ends within a bounded
    time with one line naming Flink and the lost TaskManager; the committed statistics
    stay in force."""
    root = tmp_path / "run"
    flink_cluster = engine_run.cluster
    shutil.copytree(engine_run.root, root,
                    ignore=shutil.ignore_patterns("models", "serving_models"))
    before = read_commit(str(root / "statistics"))
    status: dict[str, int] = {}
    step = threading.Thread(target=lambda: status.update(code=run_cli(
        ["statistics", "--output", str(root), "--force", *flink_cluster.beam_args()])))
    step.start()
    deadline = time.time() + 240
    while time.time() < deadline and not _flink_job_running(flink_cluster):
        time.sleep(0.5)
    assert _flink_job_running(flink_cluster), "the statistics job never started on Flink"
    local_cluster.kill_role(flink_cluster, "taskmanager")
    killed = time.time()
    try:
        step.join(timeout=180)
        assert not step.is_alive(), "the step still waits 180 s after the TaskManager died"
        took = time.time() - killed
        assert status["code"] == 2
        error = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(error) == 1, error
        assert "statistics: the Beam job failed on Flink" in error[0]
        assert "TaskManager" in error[0] and "no longer reachable" in error[0], error[0]
        after = read_commit(str(root / "statistics"))
        assert after.execution == before.execution and after.uri == before.uri
        assert Path(after.uri, "train", "stats.tfrecord").exists()
        print(f"the failure reached the CLI {took:.0f} s after the kill")
    finally:
        local_cluster.restart_role(flink_cluster, "taskmanager")


# ----------------------------------------------------------------------------- monitor

MONITOR_KEYS = ("verdict", "summary", "alerts", "checks", "windows", "traffic", "records",
                "faces", "served", "skipped", "bad_records")


def _monitor_record(run, logs: Path, out: Path, flags: list[str]) -> dict:
    from fer_pipeline.components.monitor import run_monitor
    from fer_pipeline.core.config import MonitorConfig

    config = MonitorConfig(min_requests=20, window_minutes=1)
    run_monitor([str(logs)], run.reference, "schemas/fer2013/schema.pbtxt", str(out), None,
                config, beam_args=flags)
    return json.loads((out / "monitoring.json").read_text())


@pytest.fixture(scope="module")
def monitor_logs(tmp_path_factory):
    """Tiny request logs (48 faces to both models of tests/monitor_fixtures.py, one
    unreadable record, 20 s apart: two 1-minute windows and more) and the in-process
    DirectRunner's monitoring.json on them."""
    from tests import monitor_fixtures

    root = tmp_path_factory.mktemp("monitor")
    run = monitor_fixtures.build_served_run(str(root / "run"))
    faces = monitor_fixtures.replay(run.test_faces, 48, 1)
    monitor_fixtures.write_request_log(str(root / "logs" / "requests.tfrecord"), faces, run,
                                       seconds_per_request=20)
    with tf.io.TFRecordWriter(str(root / "logs" / "garbage.tfrecord")) as writer:
        writer.write(b"not a PredictionLog")
    return run, root / "logs", _monitor_record(run, root / "logs", root / "direct", [])


def test_monitor_on_the_engine_equals_the_direct_runners(cluster: local_cluster.Cluster,
                                                         monitor_logs, tmp_path):
    """`fer-pipeline monitor`'s Beam job on the cluster (parallelism 2): the same verdict,
    distances, windows, drift and counts as the DirectRunner's on the same logs."""
    run, logs, direct = monitor_logs
    ours = _monitor_record(run, logs, tmp_path / "out", cluster.beam_args(parallelism=2))
    assert direct["faces"] == 48 and direct["bad_records"] == {"not a PredictionLog": 1}
    assert len(direct["windows"]) > 1 and direct["windows"][1]["drift"]
    for key in MONITOR_KEYS:
        assert ours[key] == direct[key], (cluster.engine, key)


# ----------------------------------------------------------------------------- doors

def test_the_job_server_listens_on_loopback_only(cluster: local_cluster.Cluster):
    """Whoever reaches a job server's job port can run code on the cluster. Beam's own
    drivers listen on every interface whatever --job-host says; ours bind the job and
    artifact ports to it (tools/engines/BoundServerFactory.java), 127.0.0.1 here."""
    for door in ("job", "artifact", "expansion"):
        port = getattr(cluster.ports, door)
        addresses = _listening_addresses(port)
        assert addresses, f"nothing listens on the {door} port {port}"
        assert all(address.is_loopback for address in addresses), (door, addresses)


def _listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets listening on `port` (/proc/net/tcp, tcp6),
    IPv4-mapped IPv6 addresses as IPv4 ones."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:   # 0A: LISTEN
                continue
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address_hex[i:i + 8])[::-1]
                           for i in range(0, len(address_hex), 8))
            address = ipaddress.ip_address(raw)
            found.add(getattr(address, "ipv4_mapped", None) or address)
    return found


def _flink_job_running(flink: local_cluster.Cluster) -> bool:
    """A job whose tasks run on the TaskManager: killing it then is a kill mid-job (a job
    in state RUNNING may still be waiting for its slots, which fails differently)."""
    base = f"http://127.0.0.1:{flink.ports.master}"
    overview = local_cluster._http_json(f"{base}/jobs/overview") or {}
    for job in overview.get("jobs", []):
        if job.get("state") == "RUNNING":
            detail = local_cluster._http_json(f"{base}/jobs/{job['jid']}") or {}
            if any(v.get("status") == "RUNNING" for v in detail.get("vertices", [])):
                return True
    return False


def test_failure_lines_name_the_engine_and_the_reason():
    """The messages engines give, as the client receives them, become one line each; a job
    server or worker pool that refuses connections is named as such."""
    with socket.socket() as job_server:            # a job server that is up
        job_server.bind(("127.0.0.1", 0))
        job_server.listen()
        endpoint = f"127.0.0.1:{job_server.getsockname()[1]}"
        nothing_there = f"localhost:{free_port()}"
        flink = PipelineOptions(["--runner=FlinkRunner", f"--job_endpoint={endpoint}",
                                 "--environment_type=EXTERNAL",
                                 f"--environment_config={nothing_there}"])
        refused = RuntimeError(
            "Pipeline BeamApp-root-1130071846-2762c4b8_ca4e5590 failed in state FAILED: "
            "java.net.ConnectException: java.net.ConnectException: finishConnect(..) failed: "
            "Connection refused")
        line = describe_failure(flink, "ingest", refused)
        assert line.startswith(f"ingest: the Beam job failed on Flink (job server {endpoint}): "
                               "ConnectException: finishConnect(..) failed: Connection refused")
        assert f"SDK worker pool {nothing_there} named by --environment_config" in line
        spark = PipelineOptions(["--runner=SparkRunner", f"--job_endpoint={endpoint}"])
        remote = RuntimeError(
            "Pipeline BeamApp-x failed in state FAILED: java.lang.RuntimeException: Error "
            "received from SDK harness for instruction 7: Traceback (most recent call last):\n"
            '  File "apache_beam/runners/common.py", line 1435, in process\n'
            "NameError: name 'np' is not defined [while running 'Parse']\n")
        assert describe_failure(spark, "ingest", remote) == (
            f"ingest: the Beam job failed on Spark (job server {endpoint}): NameError: name "
            "'np' is not defined [while running 'Parse']")
        assert "\n" not in describe_failure(spark, "augment", RuntimeError("a\nb\nc"))
        # A dead TaskManager, as Flink reports it when an RPC to it fails first (seen when
        # the kill lands as a task is deployed): said in the words the heartbeat uses.
        rpc_to_dead = RuntimeError(
            "Pipeline BeamApp-x failed in state FAILED: org.apache.flink.runtime.rpc."
            "exceptions.RecipientUnreachableException: Could not send message [Remote"
            "RpcInvocation(TaskExecutorGateway.submitTask(...))] from sender [Actor[pekko://"
            "flink/temp/taskmanager_0$bC]] to recipient [Actor[pekko.tcp://flink@127.0.0.1:"
            "36729/user/rpc/taskmanager_0#648072594]], because the recipient is unreachable.")
        line = describe_failure(flink, "statistics", rpc_to_dead)
        assert line.startswith(f"statistics: the Beam job failed on Flink (job server "
                               f"{endpoint}): a TaskManager is no longer reachable "
                               "(RecipientUnreachableException: Could not send message")
    down = PipelineOptions(["--runner=SparkRunner", f"--job_endpoint={nothing_there}"])
    assert describe_failure(down, "augment", RuntimeError("")) == (
        f"augment: cannot reach the Beam job server {nothing_there} (--job_endpoint) for "
        "Spark: is it running? (`make flink-up` / `make spark-up` start one)")


# ----------------------------------------------------------------------------- Dataflow

# Transforms each step's job must contain (their Beam labels in components/).
EXPECTED_TRANSFORMS = {
    "ingest": ["ReadLines", "Parse", "Deduplicate", "Write_train", "WriteRejected"],
    "augment": ["Read", "PlanCopies", "MakeCopy", "Write"],
    "statistics": ["Read[train]", "Stats[train]", "Write[validation]"],
    "transform": ["AnalyzeAndTransformTrain", "Transformvalidation", "WriteTransformFn"],
}


def test_dataflow_translates_every_beam_step_through_its_kfp_component(engine_data: EngineData,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setenv("NO_GCE_CHECK", "true")     # auth never probes a metadata server
    steps = {step.name: step for step in build_steps(("cnn",))}
    inputs_of = {name: {input_name: str(_committed(engine_data.direct_run,
                                                  steps[ref.split(".")[0]].directory))
                        for input_name, ref in steps[name].inputs.items()
                        if not ref.startswith("pipeline.")}
                 for name in EXPECTED_TRANSFORMS}
    for name, expected in EXPECTED_TRANSFORMS.items():
        work = tmp_path / name
        for sub in ("temp", "staging"):
            (work / sub).mkdir(parents=True)
        flags = ["--runner=DataflowRunner", "--project=fer-offline", "--region=us-central1",
                 "--dataflow_endpoint=http://localhost:1", "--no_auth",
                 f"--temp_location={work / 'temp'}", f"--staging_location={work / 'staging'}",
                 f"--template_location={work / 'job.json'}"]
        started = time.time()
        # Not an error (the runner reports it as a success): the step ends, nothing committed.
        with pytest.raises(BeamJobNotRun, match=f"^{name}: Dataflow translated the job"):
            run_component(name, inputs_of[name], str(work / "out"), json.dumps([engine_data.csv]),
                          str(tmp_path / "serving"), json.dumps({}), json.dumps(flags), "",
                          json.dumps(["cnn"]))
        assert time.time() - started < 120, f"{name}: translating took too long"
        # Each step's own template and staged proto (core/beam_job.py translation_args).
        job = json.loads((work / f"job-{name}.json").read_text())
        assert job["type"] == "JOB_TYPE_BATCH" and job["environment"], name  # Runner v2
        proto = beam_runner_api_pb2.Pipeline.FromString(
            (work / "staging" / name / "pipeline.pb").read_bytes())
        labels = {t.unique_name for t in proto.components.transforms.values()}
        for label in expected:
            assert any(label == u or u.endswith("/" + label) or u.startswith(label + "/")
                       for u in labels), f"{name}: no {label!r} in the Dataflow job"


def test_fer_pipeline_run_translates_every_beam_step_and_exits_0(engine_data: EngineData,
                                                                 tmp_path, monkeypatch, capsys):
    """`fer-pipeline run` with Dataflow translation flags: every Beam step whose inputs
    exist (here all four: the run root holds the DirectRunner's committed outputs) writes
    its own template, one line each; nothing runs or is committed; exit status 0."""
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    root = tmp_path / "run"
    shutil.copytree(engine_data.direct_run, root)
    before = {step: read_commit(str(root / step)).execution for step in
              ("examples", "augmented", "statistics", "transform")}
    for sub in ("temp", "staging"):
        (tmp_path / sub).mkdir()
    flags = ["--runner=DataflowRunner", "--project=fer-offline", "--region=us-central1",
             "--dataflow_endpoint=http://localhost:1", "--no_auth",
             f"--temp_location={tmp_path / 'temp'}", f"--staging_location={tmp_path / 'staging'}",
             f"--template_location={tmp_path / 'job.json'}"]
    capsys.readouterr()
    assert run_cli(["run", "--data", engine_data.csv, "--output", str(root), "--profile",
                    "smoke", "--config", engine_data.config, "--steps",
                    "ingest,augment,statistics,transform", *flags]) == 0
    out = capsys.readouterr()
    assert "error" not in out.err
    for name in EXPECTED_TRANSFORMS:
        template = tmp_path / f"job-{name}.json"
        assert f"{name}" in out.out and f"template {template}" in out.out, out.out
        assert json.loads(template.read_text())["type"] == "JOB_TYPE_BATCH"
        assert (tmp_path / "staging" / name / "pipeline.pb").exists()
    assert "4 Beam step(s) translated, nothing ran" in out.out
    after = {step: read_commit(str(root / step)).execution for step in before}
    assert after == before


def test_a_translation_on_an_empty_run_root_translates_ingest_and_names_the_rest(
        engine_data: EngineData, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    for sub in ("temp", "staging"):
        (tmp_path / sub).mkdir()
    root = tmp_path / "fresh"
    flags = ["--runner=DataflowRunner", "--project=fer-offline", "--region=us-central1",
             "--dataflow_endpoint=http://localhost:1", "--no_auth",
             f"--temp_location={tmp_path / 'temp'}", f"--staging_location={tmp_path / 'staging'}",
             f"--template_location={tmp_path / 'job.json'}"]
    capsys.readouterr()
    assert run_cli(["run", "--data", engine_data.csv, "--output", str(root), "--profile",
                    "smoke", "--config", engine_data.config, *flags]) == 0
    out = capsys.readouterr().out
    assert f"template {tmp_path / 'job-ingest.json'}" in out
    assert "1 Beam step(s) translated, nothing ran; not translated: augment" in out
    assert "not Beam jobs, not run: validate, train-cnn" in out
    assert (tmp_path / "job-ingest.json").exists() and not root.exists()
