"""`fer-pipeline infer`: bulk inference on Beam over a CSV and over a directory of photos.

Real Beam pipelines (DirectRunner, once on its multi-process mode) run small real
SavedModels with the export contract's signatures (tests/serving_fixtures.py) from a
serving root laid out as the pusher lays it out; every answer is checked against the same
SavedModels called in this process, and every decision against core/ensemble.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from fer_pipeline.components.bulk_inferrer import (ModelVersion, csv_rows, prediction_order,
                                                   read_committed)
from fer_pipeline.components.bulk_inferrer.outputs import shard_pattern
from fer_pipeline.components.pusher import write_serving_config
from fer_pipeline.pipeline.cli import main as fer_pipeline
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_PIXELS, FEATURE_SOURCE, INPUT_EXAMPLES,
                               PREDICTION_LOGS_DIR)
from fer_pipeline.pipeline.infer_command import resolve_models
from fer_pipeline.core.ensemble import combine_batch
from fer_pipeline.serving.faces import faces_in_file
from fer_pipeline.serving.review_queue import ReviewQueue
from tests.serving_fixtures import push_version, random_images, save_tiny_model

BIN = os.path.dirname(sys.executable)
# A tolerance this wide sends many of the tiny models' disagreements to review.
WIDE_TOLERANCE = 0.5
VERSIONS = {"cnn": 2, "vgg16": 5}


@pytest.fixture(scope="module")
def serving_root(tmp_path_factory) -> str:
    """cnn v1 and v2 and vgg16 v5, published as the pusher does; models.config serves the
    latest of each. The two models favour different classes, so they disagree."""
    root = str(tmp_path_factory.mktemp("serving"))
    templates = str(tmp_path_factory.mktemp("templates"))
    push_version(os.path.join(root, "cnn"), 1,
                 save_tiny_model(os.path.join(templates, "cnn1"), seed=0, bias_class=0))
    push_version(os.path.join(root, "cnn"), 2,
                 save_tiny_model(os.path.join(templates, "cnn2"), seed=1, bias_class=3))
    push_version(os.path.join(root, "vgg16"), 5,
                 save_tiny_model(os.path.join(templates, "vgg"), seed=2, bias_class=4))
    write_serving_config(root)
    return root


@pytest.fixture(scope="module")
def wide_tolerance_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "infer.json"
    path.write_text(json.dumps({"evaluation": {"tie_tolerance": WIDE_TOLERANCE},
                                "inference": {"min_batch_size": 4, "max_batch_size": 16}}))
    return str(path)


def in_process_probabilities(serving_root: str, pixels: np.ndarray,
                             models: dict[str, int]) -> dict[str, np.ndarray]:
    """Each model version's probabilities for uint8 [n, 48, 48] faces, called in this process."""
    found = {}
    for model, version in models.items():
        loaded = tf.saved_model.load(os.path.join(serving_root, model, str(version)))
        found[model] = loaded.signatures["serving_uint8"](
            pixels=tf.constant(pixels, tf.uint8))["probabilities"].numpy()
    return found


def committed_dir(output: str) -> str:
    """The execution directory the output's COMMIT.json names."""
    return read_committed(str(output)).uri


def prediction_rows(output: str) -> list[dict[str, str]]:
    """The committed predictions, every shard, in (source, row, face) order."""
    return sorted(csv_rows(shard_pattern(committed_dir(output), "predictions")),
                  key=prediction_order)


def rejected_rows(output: str) -> list[dict[str, str]]:
    return sorted(csv_rows(shard_pattern(committed_dir(output), "rejected")),
                  key=lambda r: (r["source"], int(r["line_number"] or 0)))


def inference_json(output: str) -> dict:
    return json.loads(open(os.path.join(committed_dir(output), "inference.json")).read())


def read_prediction_logs(output: str, model: str) -> dict[str, prediction_log_pb2.PredictionLog]:
    """The model's PredictionLogs, by the `source` feature of the example each one answered."""
    logs = {}
    pattern = os.path.join(committed_dir(output), PREDICTION_LOGS_DIR, model, "*.tfrecord")
    for record in tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        [serialized] = tf.make_ndarray(log.predict_log.request.inputs[INPUT_EXAMPLES])
        example = tf.train.Example.FromString(serialized)
        source = example.features.feature[FEATURE_SOURCE].bytes_list.value[0].decode()
        logs[source] = log
    return logs


def check_predictions(output: str, serving_root: str, keys: list[str], pixels: np.ndarray,
                      tolerance: float, models: dict[str, int] = VERSIONS
                      ) -> list[dict[str, str]]:
    """predictions.csv and the PredictionLogs equal the in-process models (name: version)
    and ensemble rule for the faces `pixels`, whose keys (`path:line` / `path#face<i>`)
    are `keys`."""
    expected = in_process_probabilities(serving_root, pixels, models)
    rows = prediction_rows(output)
    assert len(rows) == len(keys)
    for model, version in models.items():
        logs = read_prediction_logs(output, model)
        assert sorted(logs) == sorted(keys)
        for key, probabilities in zip(keys, expected[model]):
            log = logs[key]
            assert log.predict_log.request.model_spec.name == model
            assert log.predict_log.response.model_spec.version.value == version
            example = tf.train.Example.FromString(tf.make_ndarray(
                log.predict_log.request.inputs[INPUT_EXAMPLES])[0])
            assert example.features.feature[FEATURE_PIXELS].bytes_list.value[0] == \
                pixels[keys.index(key)].tobytes()
            answered = tf.make_ndarray(log.predict_log.response.outputs["probabilities"])
            np.testing.assert_allclose(answered[0], probabilities, atol=1e-5)
        for row, probabilities in zip(rows, expected[model]):
            assert row[f"{model}_class"] == CLASS_NAMES[int(np.argmax(probabilities))]
            assert float(row[f"{model}_confidence"]) == pytest.approx(probabilities.max(),
                                                                      abs=1e-5)
            assert row[f"{model}_version"] == str(version)
    class_ids, confidences, needs_review = combine_batch(expected, tolerance)
    assert [r["decision"] for r in rows] == [CLASS_NAMES[c] for c in class_ids]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], confidences, atol=1e-5)
    assert [r["needs_review"] == "yes" for r in rows] == needs_review.tolist()
    return rows


def test_csv_any_usage_label_optional_equals_the_in_process_models(
        serving_root, wide_tolerance_config, tmp_path, capsys):
    images = random_images(24, seed=21)
    labels = ["3", "", "0"] * 8                  # some rows without a label
    usages = ["Training", "PrivateTest", "SomethingElse"] * 8
    lines = [f"{label},{' '.join(map(str, image.ravel()))},{usage}"
             for label, image, usage in zip(labels, images, usages)]
    lines.insert(5, "4,1 2 3,Training")                                  # line 7
    lines.insert(11, f"9,{' '.join(['7'] * 2304)},PublicTest")           # line 13
    data = tmp_path / "faces.csv"
    data.write_text("emotion,pixels,Usage\n" + "\n".join(lines) + "\n")
    output, queue = tmp_path / "out", tmp_path / "queue"

    assert fer_pipeline(["infer", "--data", str(data), "--output", str(output),
                         "--serving-root", serving_root, "--config", wide_tolerance_config,
                         "--review-queue", str(queue)]) == 0
    printed = capsys.readouterr().out
    assert "24 face(s) scored by cnn v2, vgg16 v5" in printed and "2 rejected" in printed

    good_lines = [n for n in range(2, 28) if n not in (7, 13)]
    keys = [f"{data}:{n}" for n in good_lines]
    rows = check_predictions(str(output), serving_root, keys, images, WIDE_TOLERANCE)
    assert [int(r["row"]) for r in rows] == good_lines
    assert [r["label"] for r in rows] == [CLASS_NAMES[int(x)] if x else "" for x in labels]
    assert [r["usage"] for r in rows] == usages

    rejected = rejected_rows(output)
    assert [(r["line_number"], r["reason"].split(":")[0]) for r in rejected] == [
        ("7", "wrong_pixel_count"), ("13", "label_out_of_range")]
    assert rejected[0]["raw_line"] == "4,1 2 3,Training"

    flagged = [r for r in rows if r["needs_review"] == "yes"]
    assert flagged, "the wide tolerance must send some disagreements to review"
    with ReviewQueue(str(queue)) as review:
        assert review.counts()["pending"] == len(flagged)
        item = review.next_pending()
        assert item.source == f"{flagged[0]['source']}:{flagged[0]['row']}"
        np.testing.assert_array_equal(item.pixels, images[keys.index(item.source)])
        assert {m: p.version for m, p in item.models.items()} == VERSIONS
        assert item.decision["needs_human_review"] is True

    result = inference_json(output)
    assert result["faces_scored"] == 24 and result["rejected"] == 2
    assert result["inputs_read"] == 26 and result["needs_review"] == len(flagged)
    assert result["rejected_by_reason"] == {"label_out_of_range": 1, "wrong_pixel_count": 1}
    assert result["decisions"] == {name: [r["decision"] for r in rows].count(name)
                                   for name in {r["decision"] for r in rows}}
    assert result["review_queue"]["queued"] == len(flagged)

    # Recorded in ML Metadata: the served versions it read, the predictions it wrote.
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = str(output / "metadata.sqlite")
    store = metadata_store.MetadataStore(connection)
    [execution] = store.get_executions_by_type("fer.step.infer")
    events = store.get_events_by_execution_ids([execution.id])
    uris = {a.uri for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    assert os.path.join(serving_root, "cnn", "2") in uris
    assert read_committed(str(output)).output_uri("predictions") in uris


def _photo(path: str, label: int, seed: int) -> None:
    """One of the project's synthetic faces enlarged and padded into a 480x400 'photo'
    (the Haar cascade finds these; tests/test_client.py checks it for every class)."""
    from fer_pipeline.pipeline.synthetic import draw_faces
    face = draw_faces(np.array([label]), np.random.default_rng(seed))[0]
    big = cv2.resize(face, (240, 240), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(path, cv2.copyMakeBorder(big, 80, 80, 120, 120, cv2.BORDER_CONSTANT,
                                         value=int(face[0, 0])))


def test_directory_of_photos_faces_cut_as_the_client_cuts_them(serving_root, tmp_path):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    paths = [str(photos / "a.png"), str(photos / "more" / "b.jpg")]
    for index, path in enumerate(paths):
        _photo(path, label=[3, 5][index], seed=index)
    cv2.imwrite(str(photos / "blank.png"), np.full((200, 200), 128, np.uint8))
    (photos / "notes.txt").write_text("not an image")
    output = tmp_path / "out"

    assert fer_pipeline(["infer", "--data", str(photos), "--output", str(output),
                         "--serving-root", serving_root, "--models", "cnn,vgg16"]) == 0

    faces = [faces_in_file(path) for path in paths]
    assert [len(found) for found in faces] == [1, 1]
    pixels = np.stack([found[0].pixels for found in faces])
    rows = check_predictions(str(output), serving_root, [f"{p}#face0" for p in paths],
                             pixels, tolerance=0.05)
    assert [r["source"] for r in rows] == paths
    assert [r["box"] for r in rows] == [" ".join(map(str, f[0].box)) for f in faces]
    rejected = {r["source"]: r["reason"] for r in rejected_rows(output)}
    assert rejected[str(photos / "blank.png")].startswith("no_face_found")
    assert rejected[str(photos / "notes.txt")].startswith("unreadable_image")
    assert len(rejected) == 2


def test_named_versions_and_user_mistakes(serving_root, tmp_path, capsys):
    assert resolve_models(serving_root, ["cnn:1", "vgg16"]) == [
        ModelVersion("cnn", 1, os.path.join(serving_root, "cnn", "1")),
        ModelVersion("vgg16", 5, os.path.join(serving_root, "vgg16", "5"))]
    data = tmp_path / "faces.csv"
    data.write_text("emotion,Usage\n3,Training\n")
    mistakes = {
        ("--models", "cnn:9"): "cnn has no version 9",
        ("--models", "resnet"): "unknown model 'resnet'",
        ("--data", str(tmp_path / "missing.csv")): "does not exist",
        ("--data", str(data)): "lacks column(s) ['pixels']",
        ("--runner_typo=1",): "unrecognized argument(s) --runner_typo=1",
        ("--review-queue", str(data)): "is a file; give the queue's directory",
    }
    for extra, message in mistakes.items():
        argv = ["infer", "--data", str(data), "--output", str(tmp_path / "out"),
                "--serving-root", serving_root, *extra]
        assert fer_pipeline(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists(), extra   # a refused command creates nothing


def test_multi_processing_direct_runner_gives_the_same_predictions(serving_root, tmp_path):
    """Beam's DirectRunner on 2 worker processes: everything it pickles must import by name
    in the workers (a stand-in for the cluster engines)."""
    images = random_images(6, seed=5)
    data = tmp_path / "faces.csv"
    data.write_text("pixels\n" + "\n".join(" ".join(map(str, i.ravel())) for i in images) + "\n")
    output = tmp_path / "out"
    done = subprocess.run(
        [f"{BIN}/fer-pipeline", "infer", "--data", str(data), "--output", str(output),
         "--serving-root", serving_root, "--models", "cnn",
         "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 face(s) scored by cnn v2" in done.stdout
    check_predictions(str(output), serving_root, [f"{data}:{n}" for n in range(2, 8)],
                      images, tolerance=0.05, models={"cnn": VERSIONS["cnn"]})


def test_kubeflow_component_runs_bulk_inference(serving_root, tmp_path):
    """The bulk-inference pipeline compiles (Beam options baked in), and the component's own
    source, as KFP serializes it, runs the job into its output artifact and records it in
    the ML Metadata store it is given. (kfp.local's SubprocessRunner runs components
    the same way in tests/test_cluster.py; a second run here would cost a minute.)"""
    import yaml

    from fer_pipeline.core.artifacts import to_jsonable
    from fer_pipeline.core.config import load_config
    from fer_pipeline.pipeline.kfp_pipeline import INFERENCE_COMPONENT_SOURCE, _import_source

    path = str(tmp_path / "infer.yaml")
    assert fer_pipeline(["compile", "--kfp", path, "--bulk-inference",
                         "--direct_num_workers=1"]) == 0
    spec = yaml.safe_load(open(path))
    assert list(spec["root"]["dag"]["tasks"]) == ["bulk-inference"]
    assert json.loads(spec["root"]["inputDefinitions"]["parameters"]["beam_args_json"]
                      ["defaultValue"]) == ["--direct_num_workers=1"]
    [executor] = spec["deploymentSpec"]["executors"].values()
    assert "run_inference_component(" in " ".join(executor["container"]["command"])

    images = random_images(3, seed=9)
    data = tmp_path / "faces.csv"
    data.write_text("pixels\n" + "\n".join(" ".join(map(str, i.ravel())) for i in images) + "\n")
    artifact = tmp_path / "kfp_root" / "predictions"
    component = _import_source(INFERENCE_COMPONENT_SOURCE, "fer_kfp_inference_test")
    component.bulk_inference(
        data=str(data), serving_root=serving_root, models="cnn",
        config_json=json.dumps(to_jsonable(load_config())), beam_args_json="[]",
        metadata_db=str(tmp_path / "metadata.sqlite"),
        predictions=type("Artifact", (), {"uri": f"file://{artifact}"})())
    check_predictions(str(artifact), serving_root, [f"{data}:{n}" for n in range(2, 5)],
                      images, tolerance=0.05, models={"cnn": VERSIONS["cnn"]})
    assert (tmp_path / "metadata.sqlite").exists()


# ----------------------------------------------------------------------------- commits

def _faces_csv(path, count: int, seed: int) -> np.ndarray:
    images = random_images(count, seed=seed)
    with open(path, "w") as handle:
        handle.write("pixels\n")
        handle.writelines(" ".join(map(str, image.ravel())) + "\n" for image in images)
    return images


def _executions(output) -> list[str]:
    return sorted(name for name in os.listdir(output) if name.startswith("x-"))


def _still_in_force(output, before) -> None:
    """The commit record still names `before`'s execution, and its outputs are whole."""
    from fer_pipeline.core.artifacts import fingerprint

    now = read_committed(str(output))
    assert (now.execution, now.outputs) == (before.execution, before.outputs)
    for name, out in before.outputs.items():
        assert fingerprint(out["uri"]) == out["fingerprint"], name


def test_a_killed_job_leaves_the_previous_outputs_in_force(serving_root, tmp_path, capsys):
    """`--models` left out runs what models.config serves: here the CNN only, as after a
    demo whose gate held VGG16 back. A first run commits; a second, killed with SIGKILL
    once its shards start to appear, leaves the first's outputs whole and committed; a
    third succeeds and removes what the killed one left."""
    import shutil
    import signal
    import time

    root = tmp_path / "serving"
    shutil.copytree(os.path.join(serving_root, "cnn"), root / "cnn")
    write_serving_config(str(root))
    data, output = tmp_path / "faces.csv", tmp_path / "out"
    faces = 4000   # a job of a few seconds: time to see its first shard before it ends
    _faces_csv(data, faces, seed=13)
    argv = ["infer", "--data", str(data), "--output", str(output), "--serving-root", str(root)]

    assert fer_pipeline(argv) == 0
    assert f"{faces} face(s) scored by cnn v2 " in capsys.readouterr().out
    first = read_committed(str(output))
    assert _executions(output) == [first.execution]

    killed = subprocess.Popen([f"{BIN}/fer-pipeline", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline, started_writing = time.monotonic() + 300, False
    while not started_writing and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        started_writing = any(files for name in _executions(output) if name != first.execution
                              for _, _, files in os.walk(output / name))
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read()[-3000:]
    assert started_writing
    [left] = [name for name in _executions(output) if name != first.execution]
    _still_in_force(output, first)
    assert len(prediction_rows(output)) == faces

    assert fer_pipeline(argv) == 0
    third = read_committed(str(output))
    assert _executions(output) == [third.execution] and third.execution != left
    assert len(prediction_rows(output)) == faces


def test_a_lost_record_fails_the_job_in_one_line_and_commits_nothing(
        serving_root, tmp_path, capsys, monkeypatch):
    """A face that vanishes between the models and the predictions' sink (a fault put into
    the ensemble stage here) is caught by the job's Beam counters: the job fails as a bug,
    in one line, and the previous outputs stay committed."""
    from fer_pipeline.components.bulk_inferrer import scoring
    from fer_pipeline.core.errors import EXIT_BUG, TRACEBACK_ENV

    data, output = tmp_path / "faces.csv", tmp_path / "out"
    _faces_csv(data, 6, seed=3)
    argv = ["infer", "--data", str(data), "--output", str(output),
            "--serving-root", serving_root, "--models", "cnn"]
    assert fer_pipeline(argv) == 0
    before = read_committed(str(output))
    capsys.readouterr()

    decide = scoring.decide

    def loses_line_4(element, *args):
        (face, _, _), _ = element
        return iter(()) if face.row == 4 else decide(element, *args)

    monkeypatch.setattr(scoring, "decide", loses_line_4)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert fer_pipeline(argv) == EXIT_BUG
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "RecordsLost: bulk inference lost records (6 faces found, but 5 predictions " \
           "were written)" in err and "bug in fer-pipeline" in err
    _still_in_force(output, before)
    assert _executions(output) == [before.execution]
    assert len(prediction_rows(output)) == 6


def test_models_default_to_what_models_config_serves(serving_root, tmp_path, capsys):
    """Without --models, a serving root that serves nothing is a one-line error."""
    data = tmp_path / "faces.csv"
    _faces_csv(data, 2, seed=1)
    empty = tmp_path / "serving"
    empty.mkdir()
    write_serving_config(str(empty))   # a models.config that names no model
    assert fer_pipeline(["infer", "--data", str(data), "--output", str(tmp_path / "out"),
                         "--serving-root", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no model is served from {empty}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [m.name for m in resolve_models(serving_root, [])] == ["cnn", "vgg16"]
