"""`fer-pipeline monitor`: served traffic against the training run of the served versions.

Traffic is generated (pipeline/synthetic.py draws the faces, two real SavedModels answer
them, tests/monitor_fixtures.py logs each Predict as TF Serving's PredictionLog) and judged
against a reference built the way the pipeline builds one. Each stream must raise exactly
the alerts it should: none for the test split served again or for new faces from another
generator seed, only its own for a brightness shift, a contrast change, a blur and a
class-mix shift. The thresholds are the config's defaults (MonitorConfig).
"""
from __future__ import annotations

import html
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_serving.apis import prediction_log_pb2

from fer_pipeline.components.monitor import executor as monitor
from fer_pipeline.components.monitor.executor import collect_traffic, run_monitor
from fer_pipeline.components.monitor.reference import MonitorError, load_reference
from fer_pipeline.core.config import MonitorConfig, load_config
from fer_pipeline.core.contract import CLASS_NAMES
from fer_pipeline.serving.review_queue import ReviewQueue
from tests import monitor_fixtures as fixtures
from tests.serving_fixtures import example_bytes

SCHEMA = "schemas/fer2013/schema.pbtxt"
TOLERANCE = load_config().evaluation.tie_tolerance
STREAM = 600                           # faces per stream, above min_requests (500)
MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The served run and its reference, loaded once."""
    run = fixtures.build_served_run(str(tmp_path_factory.mktemp("served_run")))
    config = MonitorConfig()
    loaded = load_reference(run.reference, SCHEMA, config, TOLERANCE,
                            list(fixtures.MODELS))
    return run, loaded


def judge(served, logs, scratch, config=None):
    """The monitor's Beam job over `logs` (in-process DirectRunner), judged."""
    run, loaded = served
    config = config or MonitorConfig()
    traffic = collect_traffic([str(p) for p in logs], str(scratch), config)
    return monitor.assess(traffic, run.reference, loaded, config)


def blur(faces: np.ndarray) -> np.ndarray:
    """A 3x3 box blur: a camera out of focus."""
    padded = np.pad(faces.astype(np.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    total = sum(padded[:, dy:dy + 48, dx:dx + 48] for dy in range(3) for dx in range(3))
    return np.rint(total / 9).astype(np.uint8)


STREAMS = {
    "test split served again": (lambda run: fixtures.replay(run.test_faces, STREAM, 1), []),
    "another generator seed": (lambda run: fixtures.fresh_stream(STREAM, 202), []),
    "brightness +30": (lambda run: fixtures.brightness_shift(
        fixtures.replay(run.test_faces, STREAM, 2), 30), ["brightness"]),
    "contrast x0.6": (lambda run: fixtures.contrast_change(
        fixtures.replay(run.test_faces, STREAM, 3), 0.6), ["contrast"]),
    "blurred": (lambda run: blur(fixtures.replay(run.test_faces, STREAM, 4)), ["sharpness"]),
    "happy 85 %": (lambda run: fixtures.class_mix_shift(
        run.test_faces, run.test_labels, STREAM, 5, "happy", 0.85),
        ["class_mix:cnn", "class_mix:vgg16"]),
}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_each_stream_raises_exactly_its_alerts(served, tmp_path, stream):
    run, loaded = served
    make, expected = STREAMS[stream]
    log = str(tmp_path / "requests.tfrecord")
    records = fixtures.write_request_log(log, make(run), run)
    judged = judge(served, [log], tmp_path / "job")
    distances = {c["name"]: round(c["distance"], 3) for c in judged.checks}
    assert sorted(judged.alerts) == sorted(expected), distances
    assert judged.verdict == ("drift" if expected else "ok")
    assert judged.faces == STREAM and judged.traffic.records == records
    # Every check was measured by TFDV (a missing measurement would never alert).
    assert all(c["distance"] is not None for c in judged.checks), distances
    assert {c["name"] for c in judged.checks} >= {
        "brightness", "contrast", "dark_share", "bright_share", "sharpness", "pixels",
        "schema", "class_mix:cnn", "confidence:cnn", "review_rate", "bad_records"}


@pytest.fixture(scope="module")
def monitored(served, tmp_path_factory):
    """One full run_monitor over a brightness-shifted window, with a review queue, and the
    same logs judged again on the multi-processing DirectRunner (2 workers)."""
    run, _ = served
    root = tmp_path_factory.mktemp("monitored")
    log = str(root / "logs" / "requests.tfrecord")
    faces = fixtures.brightness_shift(fixtures.replay(run.test_faces, STREAM, 6), 30)
    fixtures.write_request_log(log, faces, run, seconds_per_request=60)
    config = MonitorConfig(window_minutes=30, review_lowest_confidence=5)
    result = run_monitor([str(root / "logs")], run.reference, SCHEMA, str(root / "out"),
                         str(root / "queue"), config)
    run_monitor([str(root / "logs")], run.reference, SCHEMA, str(root / "out_mp"), None,
                config, beam_args=MULTI_PROCESSING)
    return {"result": result, "faces": faces, "out": root / "out", "queue": root / "queue",
            "record": json.loads((root / "out" / "monitoring.json").read_text()),
            "multi_processing": json.loads((root / "out_mp" / "monitoring.json").read_text())}


def test_the_multi_processing_runner_gives_the_same_verdict_and_distances(monitored):
    """The same logs on the DirectRunner in-process and on 2 worker processes: the verdict,
    every distance, every window's numbers and drift are equal (not approximately)."""
    ours, theirs = monitored["record"], monitored["multi_processing"]
    for key in ("verdict", "summary", "alerts", "checks", "windows", "traffic", "records",
                "faces", "served", "skipped", "bad_records"):
        assert ours[key] == theirs[key], key
    assert not list(monitored["out"].glob(".job-*"))     # the job's scratch is removed


def test_run_monitor_writes_the_record_the_anomalies_the_page_and_the_review_queue(
        served, monitored):
    run, _ = served
    result, record, out = monitored["result"], monitored["record"], monitored["out"]
    assert result.verdict == record["verdict"] == "drift"
    assert record["alerts"] == result.alerts == ["brightness"]
    assert result.summary.startswith(f"drift in {STREAM} faces: brightness ")
    assert record["served"] == {"cnn": {"version": 2, "faces": STREAM, "other_versions": {}},
                                "vgg16": {"version": 1, "faces": STREAM,
                                          "other_versions": {}}}
    # 75 requests a minute apart: three 30-minute windows, every face in one of them; each
    # window after the first is compared with the one before (the same stream: no drift).
    assert len(record["windows"]) == 3
    assert sum(w["faces"] for w in record["windows"]) == STREAM
    assert record["windows"][0]["drift"] == {}
    for window in record["windows"][1:]:
        assert set(window["drift"]) >= {"brightness", "contrast", "class_mix:cnn",
                                        "review_rate"}
    assert record["bad_records"] == {} and record["checks"][-1]["name"] == "bad_records"
    # The answers' numbers are those of the logged probabilities.
    cnn = fixtures.predict(run.models["cnn"], monitored["faces"])
    assert record["traffic"]["mean_confidence"]["cnn"] == pytest.approx(cnn.max(axis=1).mean(),
                                                                        abs=1e-6)
    mix = record["traffic"]["class_mix"]["cnn"]
    assert mix["happy"] == pytest.approx((cnn.argmax(axis=1) == 3).mean())
    for path in result.anomalies_paths:
        assert tf.io.gfile.exists(path)
    skew = tfdv.load_anomalies_text(str(out / "skew.anomalies.pbtxt"))
    assert list(skew.anomaly_info) == ["brightness"]
    assert "Jensen-Shannon" in skew.anomaly_info["brightness"].description
    assert (out / "monitoring.html").stat().st_size > 10_000
    # The review queue got every tie and the 5 least confident faces, each once.
    ties = int(round(record["traffic"]["review_rate"] * STREAM))
    with ReviewQueue(str(monitored["queue"])) as opened:
        pending = opened.counts()["pending"]
    assert record["review_queue"]["queued"] == result.review_queued == pending
    assert ties <= pending <= ties + 5 and pending > 0


def test_monitoring_page_in_a_real_browser(monitored, tmp_path):
    from tests import browser
    from tests.test_pages_browser import check_page_basics, check_screenshot, number_mismatches

    browser.chromium_or_skip()
    record = monitored["record"]
    with browser.open_page(monitored["out"] / "monitoring.html") as opened:
        images = check_page_basics(opened, min_images=4)
        assert sum(1 for i in images if i["chart"] is None) == 12     # the faces
        numbers = browser.shown_numbers(opened.page)
        assert number_mismatches(numbers, record) == []
        paths = {n["path"] for n in numbers}
        # Every check's distance and threshold, every window's count, the class mixes.
        assert {f"checks/{i}/distance" for i in range(len(record["checks"]))} <= paths
        assert {f"windows/{i}/faces" for i in range(len(record["windows"]))} <= paths
        assert {f"traffic/class_mix/cnn/{c}" for c in CLASS_NAMES} <= paths
        # The drift section: every window after the first, every drift distance.
        assert {f"windows/{i}/drift/{name}" for i, w in enumerate(record["windows"])
                for name in w["drift"]} <= paths
        assert "against the one before" in opened.page.locator("#drift").inner_text()
        banner = opened.page.locator("#verdict")
        assert banner.get_attribute("data-verdict") == "drift"
        assert record["summary"] in banner.inner_text()
        alerts = opened.page.eval_on_selector_all(
            "[data-alert=true]", "els => els.map(e => e.dataset.check)")
        assert alerts == record["alerts"]
        charts = browser.chart_data(opened.page)
        assert charts["class-mix-cnn"]["window"] == [
            record["traffic"]["class_mix"]["cnn"][c] for c in CLASS_NAMES]
        check_screenshot(opened, tmp_path / "monitoring.png")
        # In a 1200 px window the page does not scroll sideways: the per-window table (a
        # column per model and per check) scrolls inside its own box, and all of it can
        # be reached there.
        opened.page.set_viewport_size({"width": 1200, "height": 900})
        widths = opened.page.evaluate(
            "() => ({page: document.documentElement.scrollWidth, window: window.innerWidth,"
            " boxes: [...document.querySelectorAll('.table-box')].map(b => ({"
            " scroll: b.scrollWidth, client: b.clientWidth,"
            " table: b.querySelector('table').getBoundingClientRect().width,"
            " overflow: getComputedStyle(b).overflowX}))})")
        assert widths["page"] <= widths["window"] == 1200, widths
        assert widths["boxes"] and all(b["overflow"] == "auto" for b in widths["boxes"])
        wide = [b for b in widths["boxes"] if b["scroll"] > b["client"]]
        assert wide and all(b["scroll"] + 1 >= b["table"] for b in wide), widths


def _log_entry(name: str, signature: str, inputs: dict, probabilities: np.ndarray,
               stamp: int, kind: str = "predict") -> bytes:
    entry = prediction_log_pb2.PredictionLog()
    entry.log_metadata.model_spec.name = name
    entry.log_metadata.model_spec.version.value = fixtures.MODELS[name]
    entry.log_metadata.model_spec.signature_name = signature
    entry.log_metadata.timestamp_secs = stamp
    if kind == "classify":
        entry.classify_log.request.model_spec.name = name
        return entry.SerializeToString()
    for key, value in inputs.items():
        entry.predict_log.request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    entry.predict_log.response.outputs["probabilities"].CopyFrom(
        tf.make_tensor_proto(probabilities))
    return entry.SerializeToString()


def test_the_job_takes_every_signature_and_counts_what_it_skips_and_what_is_bad(tmp_path):
    faces = fixtures.fresh_stream(3, 9)
    probs = np.full((3, 7), 1 / 7, np.float32)
    path = str(tmp_path / "mixed.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(_log_entry("cnn", "serving_default",
                                {"pixels": faces.astype(np.int32)}, probs, 100))
        writer.write(_log_entry("cnn", "serving_examples", {"examples": np.array(
            [example_bytes(f) for f in faces], dtype=object)}, probs, 200))
        writer.write(_log_entry("cnn", "explain", {"pixels": faces}, probs, 300))
        writer.write(_log_entry("cnn", "serving_uint8", {"pixels": faces}, probs[:2], 400))
        writer.write(_log_entry("cnn", "", {}, probs, 500, kind="classify"))
        writer.write(_log_entry("cnn", "serving_default", {"pixels": np.full(
            (1, 48, 48), 300, np.int32)}, probs[:1], 600))
        writer.write(_log_entry("cnn", "serving_uint8", {"pixels": faces[:, :47]},
                                probs, 700))
        writer.write(b"not a PredictionLog")
    traffic = collect_traffic([path], str(tmp_path / "job"), MonitorConfig())
    assert traffic.records == 8
    assert traffic.counts[("faces", "")] == 6
    assert traffic.served() == {("cnn", 2): 6}
    assert traffic.stamps == (100, 200)
    assert traffic.reasons("skipped") == {"explain": 1, "not a Predict": 1}
    assert traffic.reasons("bad") == {"faces and answers differ in number": 1,
                                      "pixel values outside 0..255": 1,
                                      "faces are not 48x48": 1, "not a PredictionLog": 1}
    # Every face, whichever signature carried it, reached the statistics.
    assert traffic.stats.datasets[0].num_examples == 6
    assert traffic.pixel_stats.datasets[0].num_examples == 6
    # The window: [since, until) on the records' timestamps (an unreadable record has no
    # time: it is counted whatever the window).
    from datetime import datetime, timezone
    window = collect_traffic([path], str(tmp_path / "job"), MonitorConfig(),
                             since=datetime.fromtimestamp(150, timezone.utc),
                             until=datetime.fromtimestamp(450, timezone.utc))
    assert window.records == 4 and window.stamps == (200, 200)
    assert window.counts[("faces", "")] == 3
    # A file a server still appends to ends at its last whole record, beside a closed one.
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, stamps in (("requests.tfrecord", (100, 200)), ("open.tfrecord", (300, 400))):
        with tf.io.TFRecordWriter(str(logs / name)) as writer:
            for stamp in stamps:
                writer.write(_log_entry("cnn", "serving_uint8", {"pixels": faces}, probs,
                                        stamp))
    data = (logs / "open.tfrecord").read_bytes()
    (logs / "open.tfrecord").rename(logs / "open.tfrecord.partial")
    (logs / "open.tfrecord.partial").write_bytes(data[:len(data) // 2 + 100])
    both = collect_traffic([str(logs)], str(tmp_path / "job"), MonitorConfig())
    assert both.records == 3 and both.counts[("faces", "")] == 9
    assert both.stamps == (100, 300)


def test_a_share_of_bad_records_above_max_bad_share_is_an_alert(served, tmp_path):
    run, _ = served
    log = str(tmp_path / "requests.tfrecord")
    records = fixtures.write_request_log(log, fixtures.replay(run.test_faces, STREAM, 11), run)
    bad = str(tmp_path / "bad.tfrecord")
    with tf.io.TFRecordWriter(bad) as writer:
        for stamp in range(4):      # 4 of 154 records: 2.6 % > 1 %
            writer.write(_log_entry("cnn", "serving_uint8", {"pixels": np.zeros(
                (1, 40, 40), np.uint8)}, np.full((1, 7), 1 / 7, np.float32),
                fixtures.START + stamp))
    judged = judge(served, [log, bad], tmp_path / "job")
    assert judged.traffic.records == records + 4
    assert judged.alerts == ["bad_records"] and judged.verdict == "drift"
    check = next(c for c in judged.checks if c["name"] == "bad_records")
    assert check["distance"] == pytest.approx(4 / (records + 4))
    assert "faces are not 48x48: 4" in check["description"]
    assert "bad_records 0.026 > 0.010" in judged.summary
    # Few faces do not silence it: a broken client is news in any window.
    from fer_pipeline.components.monitor.comparison import verdict
    assert verdict(10, ["bad_records"], [check], MonitorConfig())[0] == "drift"


def test_served_faces_that_break_the_serving_schema_are_an_alert_on_the_page(served,
                                                                            tmp_path):
    """The window's pixel statistics are validated against the schema's SERVING
    environment: a schema that allows only video-range pixels (16..235) turns full-range
    faces into an anomaly, shown in monitoring.json, the anomalies file and the page, and
    news even in a window too small to judge the distances."""
    run, _ = served
    faces = fixtures.replay(run.test_faces, 100, 13)
    assert faces.min() < 16 and faces.max() > 235
    schema = tmp_path / "schema.pbtxt"
    full_range = 'int_domain { name: "pixel" min: 0 max: 255 }'
    text = open(SCHEMA).read()
    assert text.count(full_range) == 1
    schema.write_text(text.replace(full_range, 'int_domain { name: "pixel" min: 16 max: 235 }'))
    fixtures.write_request_log(str(tmp_path / "logs" / "requests.tfrecord"), faces, run)
    out = tmp_path / "out"
    result = run_monitor([str(tmp_path / "logs")], run.reference, str(schema), str(out),
                         None, MonitorConfig())
    record = json.loads((out / "monitoring.json").read_text())
    assert result.alerts == record["alerts"] == ["schema"]
    assert record["verdict"] == "drift" and record["summary"].startswith(
        "drift in 100 faces: schema: pixels: ")
    check = next(c for c in record["checks"] if c["name"] == "schema")
    serving = tfdv.load_anomalies_text(str(out / "serving.anomalies.pbtxt"))
    assert list(serving.anomaly_info) == ["pixels"]
    assert check["alert"] and check["distance"] == 1.0
    assert check["description"] == f"pixels: {serving.anomaly_info['pixels'].description}"
    page = (out / "monitoring.html").read_text()
    assert 'data-check="schema" data-alert="true"' in page
    assert html.escape(check["description"]) in page
    # The checked-in schema's full range: the same faces are in the schema.
    judged = judge(served, [tmp_path / "logs" / "requests.tfrecord"], tmp_path / "job")
    schema_check = next(c for c in judged.checks if c["name"] == "schema")
    assert not schema_check["alert"] and judged.verdict == "too few requests"


def test_answers_are_joined_by_request_id_so_a_face_sent_twice_counts_twice(served,
                                                                         tmp_path):
    """The same faces in two requests each: joined by pixels they would collapse into one
    face; by request id every request counts, and the review rate and the class mix are
    shares of the same faces."""
    run, _ = served
    faces = fixtures.replay(run.test_faces, STREAM // 2, 12)
    log = str(tmp_path / "requests.tfrecord")
    fixtures.write_request_log(log, np.concatenate([faces, faces]), run)
    judged = judge(served, [log], tmp_path / "job")
    counts = judged.traffic.counts
    assert judged.faces == STREAM
    assert judged.traffic.served() == {("cnn", 2): STREAM, ("vgg16", 1): STREAM}
    assert counts[("paired", "", "cnn=2,vgg16=1")] == STREAM
    cnn = fixtures.predict(run.models["cnn"], faces)
    vgg = fixtures.predict(run.models["vgg16"], faces)
    from fer_pipeline.core.ensemble import combine_batch
    ties = combine_batch({"cnn": cnn, "vgg16": vgg}, TOLERANCE)[2]
    assert counts[("ties", "", "cnn=2,vgg16=1")] == 2 * int(ties.sum())


def test_too_few_requests_measure_but_never_alert(served, tmp_path):
    run, loaded = served
    log = str(tmp_path / "few.tfrecord")
    fixtures.write_request_log(log, fixtures.brightness_shift(run.test_faces[:80], 60), run)
    judged = judge(served, [log], tmp_path / "job")
    assert judged.verdict == "too few requests" and judged.alerts == []
    brightness = next(c for c in judged.checks if c["name"] == "brightness")
    assert brightness["distance"] > brightness["threshold"]
    assert "fewer than monitor.min_requests (500)" in judged.summary


def test_an_empty_window_is_one_clear_error(served, tmp_path):
    run, _ = served
    log = str(tmp_path / "requests.tfrecord")
    fixtures.write_request_log(log, run.test_faces[:16], run)
    from datetime import datetime, timezone
    with pytest.raises(MonitorError, match="no logged predictions in 1 request log file"):
        run_monitor([log], run.reference, SCHEMA, str(tmp_path / "out"), None, MonitorConfig(),
                    since=datetime(2030, 1, 1, tzinfo=timezone.utc))


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def run_root(served, tmp_path_factory):
    """A run root whose ML Metadata records the push of the served versions."""
    run, _ = served
    root = tmp_path_factory.mktemp("run_root")
    fixtures.record_lineage(str(root), run, str(root / "serving_models"))
    return root


def test_cli_finds_the_reference_through_lineage_and_records_the_execution(
        served, run_root, tmp_path, capsys):
    from fer_pipeline.pipeline.cli import EXIT_DRIFT, main
    from fer_pipeline.core.config import MetadataConfig
    from fer_pipeline.pipeline.metadata import MetadataStore

    run, _ = served
    logs = tmp_path / "logs"
    fixtures.write_request_log(str(logs / "cnn" / "calm.tfrecord"),
                               fixtures.replay(run.test_faces, STREAM, 7), run)
    fixtures.write_request_log(str(logs / "cnn" / "shifted.tfrecord"),
                               fixtures.contrast_change(
                                   fixtures.replay(run.test_faces, STREAM, 8), 0.6),
                               run, start=fixtures.START + 3600)
    calm_until = "2026-09-21T15:10:00Z"          # START + 3,400 s: only the first file
    code = main(["monitor", "--output", str(run_root), "--logs", str(logs), "--until",
                 calm_until, "--out", str(tmp_path / "calm")])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert f"[fer-pipeline] monitor: no drift: {STREAM} faces" in out
    assert f"monitoring page: {tmp_path / 'calm' / 'monitoring.html'}" in out
    # --min-requests above the window's faces: measured, not judged.
    assert main(["monitor", "--output", str(run_root), "--logs", str(logs), "--until",
                 calm_until, "--out", str(tmp_path / "few"), "--min-requests", "700"]) == 0
    assert "fewer than monitor.min_requests (700)" in capsys.readouterr().out

    code = main(["monitor", "--output", str(run_root), "--logs", str(logs), "--since",
                 calm_until, "--out", str(tmp_path / "shifted")])
    out = capsys.readouterr().out
    assert code == EXIT_DRIFT
    line = next(text for text in out.splitlines()
                if text.startswith("[fer-pipeline] monitor:"))
    assert line.startswith(f"[fer-pipeline] monitor: drift in {STREAM} faces: contrast ")
    record = json.loads((tmp_path / "shifted" / "monitoring.json").read_text())
    assert record["reference"]["examples_dir"] == run.reference.examples_dir
    assert record["reference"]["versions"] == fixtures.MODELS

    # Both files, with a Beam flag (the monitor takes the data steps'): the hour of contrast change
    # drifts from the calm hour before it (TFDV's drift comparator), and only in contrast.
    code = main(["monitor", "--output", str(run_root), "--logs", str(logs), "--out",
                 str(tmp_path / "both"), "--direct_running_mode=in_memory"])
    both = json.loads((tmp_path / "both" / "monitoring.json").read_text())
    # Over the two hours together the contrast change is diluted below its threshold (per
    # window alerts and drift are shown, not the verdict): exit 0.
    assert code == 0 and both["alerts"] == [], capsys.readouterr().err
    assert [w["faces"] for w in both["windows"]] == [STREAM, STREAM]
    assert both["windows"][0]["drift"] == {}
    assert both["windows"][1]["drift_alerts"] == ["contrast"], both["windows"][1]["drift"]

    store = MetadataStore(MetadataConfig(), str(run_root))
    executions = store._store.get_executions_by_type("fer.step.monitor")
    assert len(executions) == 4
    described = store._describe(executions[2])
    pushed = {p["model"]: p["id"] for p in store.pushed_versions()}
    assert {a["id"] for a in described["inputs"]["model_cnn"]} == {pushed["cnn"]}
    assert {a["id"] for a in described["inputs"]["model_vgg16"]} == {pushed["vgg16"]}
    assert sorted(a["uri"] for a in described["inputs"]["request_logs"]) == sorted(
        str(p) for p in (logs / "cnn").iterdir())
    assert described["outputs"]["monitoring"][0]["uri"] == str(
        tmp_path / "shifted" / "monitoring.json")


def test_cli_one_line_errors(run_root, tmp_path, capsys):
    from fer_pipeline.pipeline.cli import main

    assert main(["monitor", "--output", str(run_root), "--logs",
                 str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"[fer-pipeline] error: no request log at {tmp_path / 'missing'}"
    assert main(["monitor", "--output", str(run_root), "--logs", str(tmp_path),
                 "--since", "yesterday"]) == 2
    assert "'yesterday' is not a time" in capsys.readouterr().err
    # Logs of a version nobody pushed: the store has no lineage for it.
    entry = _log_entry("cnn", "serving_uint8", {"pixels": fixtures.fresh_stream(2, 3)},
                       np.full((2, 7), 1 / 7, np.float32), 100)
    other = prediction_log_pb2.PredictionLog.FromString(entry)
    other.log_metadata.model_spec.version.value = 99
    with tf.io.TFRecordWriter(str(tmp_path / "v99.tfrecord")) as writer:
        writer.write(other.SerializeToString())
    assert main(["monitor", "--output", str(run_root), "--logs",
                 str(tmp_path / "v99.tfrecord")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the request logs name cnn v99" in err[0]
    # A run root with no ML Metadata: one line, and no store created there.
    assert main(["monitor", "--output", str(tmp_path / "typo"), "--logs",
                 str(tmp_path / "v99.tfrecord")]) == 2
    assert "no ML Metadata store at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_kubeflow_component_runs_the_monitor(served, run_root, tmp_path):
    """The monitoring pipeline compiles to one component, and the component's own source,
    as KFP serializes it, runs the job into its output artifact, records it in the ML
    Metadata store it is given and returns the verdict. (kfp.local's SubprocessRunner runs
    components the same way in tests/test_cluster.py; another run here would cost a
    minute.)"""
    import shutil

    import yaml

    from fer_pipeline.core.artifacts import to_jsonable
    from fer_pipeline.pipeline.cli import main
    from fer_pipeline.core.config import MetadataConfig
    from fer_pipeline.pipeline.kfp_pipeline import MONITOR_COMPONENT_SOURCE, _import_source
    from fer_pipeline.pipeline.metadata import MetadataStore

    run, _ = served
    path = str(tmp_path / "monitor.yaml")
    assert main(["compile", "--kfp", path, "--monitor"]) == 0
    spec = yaml.safe_load(open(path))
    assert list(spec["root"]["dag"]["tasks"]) == ["monitor"]
    [executor] = spec["deploymentSpec"]["executors"].values()
    assert "run_monitor_component(" in " ".join(executor["container"]["command"])

    log = tmp_path / "logs" / "requests.tfrecord"
    fixtures.write_request_log(str(log), fixtures.contrast_change(
        fixtures.replay(run.test_faces, STREAM, 9), 0.6), run)
    store = tmp_path / "metadata.sqlite"
    shutil.copy(run_root / "metadata.sqlite", store)
    recorded = MetadataStore(MetadataConfig(sqlite_path=str(store)), str(run_root))
    before = len(recorded._store.get_executions_by_type("fer.step.monitor"))
    artifact = tmp_path / "kfp_root" / "monitoring"
    component = _import_source(MONITOR_COMPONENT_SOURCE, "fer_kfp_monitor_test")
    verdict = component.monitor(
        run_root=str(run_root), logs=str(log.parent), since="", until="",
        config_json=json.dumps(to_jsonable(load_config())), metadata_db=str(store),
        monitoring=type("Artifact", (), {"uri": f"file://{artifact}"})())
    record = json.loads((artifact / "monitoring.json").read_text())
    assert verdict == record["verdict"] == "drift" and record["alerts"] == ["contrast"]
    recorded = MetadataStore(MetadataConfig(sqlite_path=str(store)), str(run_root))
    assert len(recorded._store.get_executions_by_type("fer.step.monitor")) == before + 1


# ----------------------------------------------------------------------------- a real run

def test_monitor_on_the_smoke_run_finds_its_reference_through_real_lineage(smoke_run,
                                                                          tmp_path):
    """The session's pipeline run (read-only): its test split served by its pushed
    versions is judged against the references the pipeline itself recorded, the pixel
    statistics of its statistics step and the test predictions of its evaluation."""
    import dataclasses
    import shutil

    from fer_pipeline.components.evaluator import load_test_split
    from fer_pipeline.pipeline.monitor_command import run_monitor_job
    from fer_pipeline.pipeline.runner import committed_output
    from fer_pipeline.core.serving_root import read_model_server_config

    run_root = smoke_run.run_root
    specs = read_model_server_config(os.path.join(smoke_run.ctx.serving_root,
                                                  "models.config"))
    served = {}
    for spec in specs:
        version = max(int(v) for v in os.listdir(spec.base_path) if v.isdigit())
        served[spec.name] = (version, os.path.join(spec.base_path, str(version)))
    examples = committed_output(run_root, "ingest")
    faces = load_test_split(examples).pixels
    fixtures.log_predictions(str(tmp_path / "logs" / "requests.tfrecord"), faces, served)
    # ML Metadata is written to a copy: the session's run stays as it was.
    store_copy = tmp_path / "metadata.sqlite"
    shutil.copy(os.path.join(run_root, "metadata.sqlite"), store_copy)
    config = dataclasses.replace(
        smoke_run.config, monitor=MonitorConfig(min_requests=100),
        metadata=dataclasses.replace(smoke_run.config.metadata, sqlite_path=str(store_copy)))
    result = run_monitor_job(run_root, [str(tmp_path / "logs")], str(tmp_path / "out"),
                             config)
    record = json.loads((tmp_path / "out" / "monitoring.json").read_text())
    reference = record["reference"]
    same = os.path.realpath
    assert same(reference["examples_dir"]) == same(examples)
    assert same(reference["statistics_dir"]) == same(committed_output(run_root, "statistics"))
    evaluation = same(committed_output(run_root, "evaluate"))
    assert {same(d) for d in reference["evaluations"].values()} == {evaluation}
    assert record["served"].keys() == served.keys()
    # The test split answered by the versions its evaluation scored: the same answers (the
    # evaluation ran serving_examples, the log serving_uint8: equal up to float rounding).
    checks = {c["name"]: c for c in record["checks"]}
    for model in served:
        assert checks[f"class_mix:{model}"]["distance"] < 0.01
        assert checks[f"confidence:{model}"]["distance"] < 0.01
    assert result.verdict == "ok", result.summary


def test_the_logs_default_to_the_directories_models_config_logs_to(tmp_path):
    from fer_pipeline.pipeline.monitor_command import configured_log_dirs, parse_moment
    from fer_pipeline.core.serving_root import ModelSpec, RequestLogSpec, write_model_server_config

    logs = tmp_path / "request_logs"
    write_model_server_config(str(tmp_path / "models.config"), [
        ModelSpec("cnn", str(tmp_path / "cnn"),
                  request_log=RequestLogSpec(str(logs / "cnn" / "requests"), 0.5)),
        ModelSpec("vgg16", str(tmp_path / "vgg16"),
                  request_log=RequestLogSpec(str(logs / "vgg16" / "requests"), 1.0))])
    assert configured_log_dirs(str(tmp_path)) == [str(logs / "cnn"), str(logs / "vgg16")]
    write_model_server_config(str(tmp_path / "models.config"),
                              [ModelSpec("cnn", str(tmp_path / "cnn"))])
    with pytest.raises(ValueError, match="turns request logging on for no model"):
        configured_log_dirs(str(tmp_path))
    # Times: ISO 8601 (UTC unless said) or a duration ago.
    from datetime import datetime, timezone
    now = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)
    assert parse_moment("2h", now) == datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    assert parse_moment("2026-11-30T07:00:00Z") == datetime(2026, 11, 30, 7,
                                                            tzinfo=timezone.utc)
    assert parse_moment("2026-11-30T07:00") == datetime(2026, 11, 30, 7, tzinfo=timezone.utc)


def test_a_window_larger_than_the_pixel_sample_uses_every_face_for_the_features(
        served, tmp_path, monkeypatch):
    from fer_pipeline.components.monitor import job as monitor_job

    monkeypatch.setattr(monitor_job, "MAX_PIXEL_FACES", 200)
    log = str(tmp_path / "requests.tfrecord")
    fixtures.write_request_log(log, fixtures.replay(served[0].test_faces, STREAM, 10),
                               served[0])
    judged = judge(served, [log], tmp_path / "job")
    assert judged.verdict == "ok" and judged.faces == STREAM
    assert judged.traffic.stats.datasets[0].num_examples == STREAM
    assert 0 < judged.traffic.pixel_stats.datasets[0].num_examples < STREAM
    pixels = next(c for c in judged.checks if c["name"] == "pixels")
    assert pixels["distance"] is not None and pixels["distance"] < pixels["threshold"]
