"""The notebook's models through the gate: `fer-pipeline import-model` on small .h5 files
with the notebook's own architectures (tests/notebook_models.py), then evaluate,
infra-validate and push through the CLI, fer-serve answering from the pushed versions
with the notebook's preprocessing, and lineage naming the file and its sha256.

The run root borrows the session's smoke run (read-only): its ingest and transform commit
records, which name the smoke run's outputs, and a copy of its ML Metadata store, so
lineage walks from the pushed version back to the CSV. Nothing is trained here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fer_pipeline.core.artifacts import COMMIT_FILE, read_commit
from fer_pipeline.core.calibration import softmax
from fer_pipeline.core.config import ImportConfig, MetadataConfig
from fer_pipeline.core.contract import (MODELS_CONFIG, SERVING_MODEL_DIR, SIGNATURE_DEFAULT,
                                        TRANSFORM_GRAPH_DIR)
from fer_pipeline.core.errors import InputDataError
from fer_pipeline.core.model_card import CARD_DIR, CARD_JSON, validate_card
from fer_pipeline.core.net import free_port
from fer_pipeline.pipeline import cli
from fer_pipeline.pipeline.lineage import model_lineage
from tests import notebook_models
from tests.serving_fixtures import random_images, start_server_process

GATE = ("evaluation:\n  baseline_margin: -1\n"   # untrained files: let them through the gate
        "  min_accuracy: {cnn_notebook: 0.0, vgg_notebook: 0.0}\n")
IMPORTED = ("cnn_notebook", "vgg_notebook")


def _cli(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def imported_run(smoke_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imported")
    run = root / "run"
    for directory in ("examples", "transform"):
        (run / directory).mkdir(parents=True)
        shutil.copy(Path(smoke_run.run_root, directory, COMMIT_FILE), run / directory)
    shutil.copy(Path(smoke_run.run_root, "metadata.sqlite"), run / "metadata.sqlite")
    files = {}
    for name, model in (("cnn_notebook", notebook_models.notebook_cnn()),
                        ("vgg_notebook", notebook_models.notebook_vgg())):
        notebook_models.fit_a_step(model)
        files[name] = notebook_models.save_h5(model, str(root / f"modelo_{name[:3]}.h5"))
    config = root / "gate.yaml"
    config.write_text(GATE)
    for name, path in files.items():
        assert _cli("import-model", "--output", str(run), "--keras", path, "--name", name) == 0
    models = ",".join(IMPORTED)
    for command in ("evaluate", "infra-validate", "push"):
        assert _cli(command, "--output", str(run), "--models", models,
                    "--config", str(config)) == 0
    return {"run": str(run), "files": files, "serving_root": str(run / "serving_models")}


def test_imported_models_are_pushed_and_answer_as_the_notebook_computed(imported_run):
    import keras

    root = imported_run["serving_root"]
    for name in IMPORTED:
        assert Path(root, name, "1", "saved_model.pb").exists(), name
        card = json.loads(Path(root, name, "1", CARD_DIR, CARD_JSON).read_text())
        validate_card(card)            # the card says where the file came from
        assert imported_run["files"][name] in card["model_details"]["documentation"]
    faces = random_images(3, seed=5)
    server = start_server_process(os.path.join(root, MODELS_CONFIG), free_port(),
                                  rest_port := free_port(), list(IMPORTED))
    try:
        answers = {name: _rest_predict(rest_port, name, faces) for name in IMPORTED}
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name, path in imported_run["files"].items():
        model = keras.saving.load_model(path, compile=False)
        channels = model.input_shape[-1]
        # The notebook's preprocessing: pixels / 255 at (48, 48, channels).
        inputs = np.repeat(faces[..., None].astype("float32") / 255.0, channels, axis=-1)
        expected = np.asarray(model(inputs), np.float64)
        # Served: the file's logits and softmax(logits / T), T fitted on the smoke run's
        # validation split (its pixels recovered from the transformed split) at import.
        info = json.loads(Path(read_commit(os.path.join(imported_run["run"], "imported", name)).uri,
                               "training_info.json").read_text())
        calibration = info["calibration"]
        assert calibration["calibrated"] and calibration["logits"] == "logits", name
        assert calibration["examples"] > 100 and calibration["temperature"] > 0
        logits = np.asarray(answers[name]["logits"], np.float64)
        np.testing.assert_allclose(softmax(logits), expected, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(answers[name]["probabilities"]),
                                   softmax(logits, calibration["temperature"]), atol=1e-5)
        assert answers[name]["class_id"] == expected.argmax(axis=1).tolist()


def _rest_predict(port: int, model: str, faces: np.ndarray) -> dict:
    body = json.dumps({"signature_name": SIGNATURE_DEFAULT,
                       "inputs": {"pixels": faces.astype(int).tolist()}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{model}:predict",
                                     data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)["outputs"]


def test_lineage_names_the_imported_file_and_its_sha256(imported_run):
    # (The store copied from the smoke run holds its own pushes too.)
    lineages = {name: model_lineage(imported_run["run"], MetadataConfig(), name)[0]
                for name in IMPORTED}
    for name, path in imported_run["files"].items():
        imported = lineages[name]["imported"]
        assert imported["uri"] == path
        assert imported["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert lineages[name]["data"], "lineage reaches the CSV the test split came from"
        info = json.loads(Path(lineages[name]["training"]["execution_dir"],
                               "training_info.json").read_text())
        assert info["imported"]["sha256"] == imported["sha256"]
        assert info["imported"]["channels_repeated"] == (name == "vgg_notebook")


def test_a_file_whose_output_is_not_a_7_way_softmax_is_refused_in_one_line(
        imported_run, tmp_path, capsys):
    linear = notebook_models.save_h5(notebook_models.notebook_vgg(final_activation="linear"),
                                     str(tmp_path / "linear.h5"))
    committed = Path(imported_run["run"], "imported", "vgg_notebook", COMMIT_FILE)
    before = committed.read_text()
    status = _cli("import-model", "--output", imported_run["run"], "--keras", linear,
                  "--name", "vgg_notebook")
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.count("\n") == 0
    assert error.startswith("[fer-pipeline] error: ") and "not a 7-way softmax" in error
    assert committed.read_text() == before     # the imported model stays the one it was


def test_other_input_sizes_are_resized_and_grey_repeated_inside_the_graph(smoke_run,
                                                                           tmp_path):
    import keras
    import tensorflow as tf

    from fer_pipeline.components.model_importer import run_model_importer

    transform = Path(smoke_run.run_root, "transform")
    transform_dir = json.loads((transform / COMMIT_FILE).read_text())["uri"]
    model = notebook_models.notebook_cnn(input_shape=(64, 64, 3))
    path = notebook_models.save_h5(model, str(tmp_path / "wide.h5"))
    result = run_model_importer(path, transform_dir, str(tmp_path / "out"),
                                ImportConfig(), "cnn_notebook")
    assert (result.resized, result.channels_repeated) == (True, True)
    assert result.input_shape == [64, 64, 3]
    faces = random_images(2, seed=9)
    # The served logits are the file's (the calibrated probabilities: softmax(logits / T)).
    served = tf.saved_model.load(result.serving_model_dir).signatures[SIGNATURE_DEFAULT](
        pixels=tf.constant(faces.astype(np.int32)))["logits"].numpy()
    grey = tf.image.resize(faces[..., None].astype("float32") / 255.0, (64, 64))
    expected = np.asarray(keras.saving.load_model(path, compile=False)(
        tf.repeat(grey, 3, axis=-1)))
    np.testing.assert_allclose(softmax(served), expected, atol=1e-5)
    assert Path(transform_dir, TRANSFORM_GRAPH_DIR).is_dir()
    assert Path(result.serving_model_dir).name == SERVING_MODEL_DIR


def test_an_open_input_size_needs_input_shape(tmp_path):
    import keras

    from fer_pipeline.components.model_importer import run_model_importer

    inputs = keras.Input(shape=(None, None, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(pooled))
    path = str(tmp_path / "open.keras")
    model.save(path)
    with pytest.raises(InputDataError, match="--input-shape HEIGHT,WIDTH,CHANNELS"):
        run_model_importer(path, str(tmp_path / "no-transform"), str(tmp_path / "out"),
                           ImportConfig(), "cnn_notebook")
