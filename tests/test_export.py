"""The exported SavedModel serves exactly what the in-memory transform + Keras model compute."""
from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

from fer_pipeline.core.serving_export import export_serving_model
from fer_pipeline.components.trainer.models import build_cnn
from fer_pipeline.pipeline.synthetic import draw_faces
from fer_pipeline.components.transform import run_transform
from fer_pipeline.core.config import ModelConfig, TransformConfig
from fer_pipeline.core.training_data import make_dataset, split_pattern
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_IMAGE, FEATURE_LABEL, FEATURE_PIXELS,
    IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS)

TOLERANCE = 1e-5


def write_raw_examples(examples_dir: str, counts: dict[str, int], seed: int) -> None:
    """Raw tf.Examples (pixels bytes + emotion) of synthetic faces, balanced classes."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        labels = rng.permutation(np.arange(count) % NUM_CLASSES)
        faces = draw_faces(labels, rng)
        split_dir = os.path.join(examples_dir, split)
        os.makedirs(split_dir, exist_ok=True)
        path = os.path.join(split_dir, "examples-00000-of-00001.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for face, label in zip(faces, labels):
                writer.write(raw_example(face, int(label)))


def raw_example(face: np.ndarray, label: int | None = None) -> bytes:
    feature = {FEATURE_PIXELS: tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[np.asarray(face, np.uint8).tobytes()]))}
    if label is not None:
        feature[FEATURE_LABEL] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def make_transform_dir(root: str, counts: dict[str, int], seed: int = 0) -> str:
    """A real Transform step output (transform_graph + transformed splits) under root."""
    examples = os.path.join(root, "examples")
    write_raw_examples(examples, counts, seed)
    output = os.path.join(root, "transform")
    run_transform(examples, examples, output, TransformConfig(), beam_args=[])
    return output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One model exported twice: as trained (T = 1) and calibrated on the validation split."""
    root = tmp_path_factory.mktemp("export")
    transform_dir = make_transform_dir(str(root), {"train": 140, "validation": 14,
                                                   "test": 14})
    graph_dir = os.path.join(transform_dir, "transform_graph")
    reference_graph = str(root / "reference_graph")
    shutil.copytree(graph_dir, reference_graph)

    keras.utils.set_random_seed(3)
    model = build_cnn(ModelConfig(batch_size=8, epochs=1, learning_rate=1e-3))
    # Random weights give near-uniform outputs; a few steps make the comparison sharper.
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, NUM_PIXELS)), rng.integers(0, NUM_CLASSES, 32),
              epochs=2, verbose=0)
    export_dir = str(root / "serving_model")
    uncalibrated = export_serving_model(model, graph_dir, export_dir)
    # What the trainer passes: the transformed validation split, (image, label) batches.
    calibrated_dir = str(root / "calibrated_model")
    record = export_serving_model(model, graph_dir, calibrated_dir, calibration_batches=(
        make_dataset(split_pattern(transform_dir, "validation"), 8, training=False, seed=0)))
    # The export must not need the transform directory any more.
    shutil.rmtree(transform_dir)
    return export_dir, model, reference_graph, uncalibrated, calibrated_dir, record


@pytest.fixture(scope="module")
def exported(built):
    """(export dir, in-memory model, copy of the transform graph for reference)."""
    return built[:3]


def _faces(n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(11)
    faces = draw_faces(np.arange(n) % NUM_CLASSES, rng)
    faces[0] = 0     # extremes of the pixel range
    faces[1] = 255
    return faces


def _expected(model: keras.Model, graph_dir: str, faces: np.ndarray) -> np.ndarray:
    raw = tf.constant([face.tobytes() for face in faces])
    image = tft.TFTransformOutput(graph_dir).transform_raw_features(
        {FEATURE_PIXELS: raw})[FEATURE_IMAGE]
    return model.predict(image.numpy(), verbose=0)


def _check(outputs: dict, expected: np.ndarray) -> None:
    probs = outputs["probabilities"].numpy()
    assert outputs["probabilities"].dtype == tf.float32
    assert probs.shape == expected.shape == (len(expected), NUM_CLASSES)
    np.testing.assert_allclose(probs, expected, atol=TOLERANCE, rtol=0)
    class_id = outputs["class_id"].numpy()
    assert outputs["class_id"].dtype == tf.int64
    np.testing.assert_array_equal(class_id, expected.argmax(axis=1))
    assert [name.decode() for name in outputs["class_name"].numpy()] == [
        CLASS_NAMES[i] for i in class_id]


def test_signatures_declare_the_contract(exported):
    loaded = tf.saved_model.load(exported[0])
    assert set(loaded.signatures) == {"serving_default", "serving_uint8", "serving_examples",
                                      "explain"}
    for name, dtype in (("serving_default", tf.int32), ("serving_uint8", tf.uint8),
                        ("explain", tf.uint8)):
        spec = loaded.signatures[name].structured_input_signature[1]["pixels"]
        assert spec.dtype == dtype and spec.shape.rank is None
    spec = loaded.signatures["serving_examples"].structured_input_signature[1]["examples"]
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    outputs = loaded.signatures["serving_default"].structured_outputs
    assert outputs["probabilities"].shape.as_list() == [None, NUM_CLASSES]
    assert outputs["class_id"].dtype == tf.int64
    assert outputs["class_name"].dtype == tf.string
    explain = loaded.signatures["explain"].structured_outputs
    assert set(explain) == {"probabilities", "class_id", "class_name", "logits", "saliency"}
    assert explain["saliency"].shape.as_list() == [None, NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE]


def test_the_export_is_what_the_contract_declares(exported):
    """core/contract.SERVED_SIGNATURES (the documentation's signature reference is
    generated from it) names every signature, tensor and dtype of a real export."""
    from fer_pipeline.core.contract import CLASSES_DIM, SERVED_SIGNATURES

    loaded = tf.saved_model.load(exported[0])
    assert set(loaded.signatures) == set(SERVED_SIGNATURES)
    for name, (_, inputs, outputs) in SERVED_SIGNATURES.items():
        signature = loaded.signatures[name]
        given = signature.structured_input_signature[1]
        assert {k: v.dtype.name for k, v in given.items()} == {
            tensor: dtype for tensor, dtype, _ in inputs}, name
        answered = signature.structured_outputs
        assert {k: v.dtype.name for k, v in answered.items()} == {
            tensor: dtype for tensor, dtype, _ in outputs}, name
        for tensor, _, shape in outputs:   # "[batch, classes]": rank and fixed dimensions
            fixed = {"batch": None, CLASSES_DIM: NUM_CLASSES}   # this export's 7 classes
            dims = [fixed[d] if d in fixed else int(d) for d in shape.strip("[]").split(", ")]
            assert answered[tensor].shape.as_list() == dims, (name, tensor)

@pytest.mark.parametrize("signature,dtype", [("serving_default", tf.int32),
                                             ("serving_uint8", tf.uint8)])
@pytest.mark.parametrize("shape", ["grid", "flat"])
def test_pixel_signatures_match_the_in_memory_model(exported, signature, dtype, shape):
    export_dir, model, graph_dir = exported
    faces = _faces()
    expected = _expected(model, graph_dir, faces)
    pixels = faces if shape == "grid" else faces.reshape(len(faces), NUM_PIXELS)
    assert pixels.shape[1:] == ((IMAGE_SIZE, IMAGE_SIZE) if shape == "grid" else (NUM_PIXELS,))
    serve = tf.saved_model.load(export_dir).signatures[signature]
    _check(serve(pixels=tf.constant(pixels, dtype)), expected)


def test_examples_signature_matches_the_in_memory_model(exported):
    export_dir, model, graph_dir = exported
    faces = _faces()
    expected = _expected(model, graph_dir, faces)
    # Requests carry no label (and may carry other raw features): only pixels is read.
    examples = [raw_example(face) for face in faces[:3]] + [
        raw_example(face, label=1) for face in faces[3:]]
    serve = tf.saved_model.load(export_dir).signatures["serving_examples"]
    _check(serve(examples=tf.constant(examples)), expected)


def test_out_of_range_int32_pixels_are_rejected(exported):
    serve = tf.saved_model.load(exported[0]).signatures["serving_default"]
    pixels = np.full((1, NUM_PIXELS), 256, np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixels must be"):
        serve(pixels=tf.constant(pixels))


# --- the explain signature --------------------------------------------------------------

@pytest.fixture(scope="module")
def explained(exported):
    """(faces, outputs of the explain signature on them)."""
    faces = _faces(4)[2:]            # two drawn faces (the first two are all-black/white)
    serve = tf.saved_model.load(exported[0]).signatures["explain"]
    return faces, serve(pixels=tf.constant(faces, tf.uint8))


def test_explain_returns_the_same_answers_as_serving(exported, explained):
    export_dir, model, graph_dir = exported
    faces, outputs = explained
    _check({k: v for k, v in outputs.items() if k != "saliency"},
           _expected(model, graph_dir, faces))


def test_saliency_maps_have_one_normalized_map_per_class(explained):
    faces, outputs = explained
    saliency = outputs["saliency"].numpy()
    assert outputs["saliency"].dtype == tf.float32
    assert saliency.shape == (len(faces), NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE)
    assert np.all(np.isfinite(saliency)) and saliency.min() >= 0.0 and saliency.max() <= 1.0
    peaks = saliency.max(axis=(2, 3))
    # Each map is scaled by its own maximum: it peaks at exactly 1, or is all zeros when
    # nothing in the face pushed the model towards that class.
    assert np.all(np.isclose(peaks, 1.0) | (peaks == 0.0))
    assert np.isclose(peaks, 1.0).sum() >= len(faces) * (NUM_CLASSES - 1)
    for per_face in saliency:
        for a in range(NUM_CLASSES):
            for b in range(a + 1, NUM_CLASSES):
                assert np.abs(per_face[a] - per_face[b]).mean() > 1e-3, (a, b)
    # A map highlights part of the face, not all of it.
    assert 0.0 < saliency.mean() < 0.5


def test_saliency_follows_the_integrated_gradients_definition(exported, explained):
    """Recomputes the predicted class's map in eager mode from the in-memory model."""
    export_dir, model, graph_dir = exported
    faces, outputs = explained
    transform = tft.TFTransformOutput(graph_dir)

    def normalized(images: np.ndarray) -> tf.Tensor:
        raw = tf.constant([image.tobytes() for image in images])
        return tf.cast(transform.transform_raw_features(
            {FEATURE_PIXELS: raw})[FEATURE_IMAGE], tf.float32)

    image = normalized(faces[:1])[0]
    black = normalized(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))[0]
    steps = 16
    alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps
    path = tf.constant(black[None] + alphas[:, None] * (image - black)[None])
    top = int(outputs["class_id"].numpy()[0])
    with tf.GradientTape() as tape:
        tape.watch(path)
        probability = model(path, training=False)[:, top]
    gradient = tape.gradient(probability, path).numpy().mean(axis=0)
    attribution = np.maximum((image - black).numpy() * gradient, 0)
    expected = (attribution / attribution.max()).reshape(IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(outputs["saliency"].numpy()[0, top], expected, atol=1e-4)


def test_fer_serve_serves_explanations_over_grpc_and_rest(exported, tmp_path):
    from fer_pipeline.serving.client import FerClient
    from fer_pipeline.core.serving_root import ModelSpec, write_model_server_config
    from fer_pipeline.serving.server import FerServer, ServerConfig
    from tests.serving_fixtures import push_version

    push_version(str(tmp_path / "cnn"), 4, exported[0])
    config = write_model_server_config(str(tmp_path / "models.config"),
                                       [ModelSpec("cnn", str(tmp_path / "cnn"))])
    server = FerServer(ServerConfig(config, port=0, rest_port=0)).start()
    try:
        faces = _faces(3)
        direct = tf.saved_model.load(exported[0]).signatures["explain"](
            pixels=tf.constant(faces, tf.uint8))
        for protocol in ("grpc", "rest"):
            client = FerClient(grpc_port=server.grpc_port, rest_port=server.rest_port,
                               protocol=protocol, retries=0)
            answer = client.explain("cnn", faces)
            assert answer.version == 4
            np.testing.assert_allclose(answer.probabilities, direct["probabilities"].numpy(),
                                       atol=TOLERANCE)
            np.testing.assert_allclose(answer.saliency, direct["saliency"].numpy(), atol=1e-5)
    finally:
        server.stop()


def test_an_export_without_validation_batches_is_recorded_as_not_calibrated(built):
    export_dir, model, graph_dir, uncalibrated = built[:4]
    assert uncalibrated["calibrated"] is False and uncalibrated["temperature"] == 1.0
    assert "not calibrated" in uncalibrated["reason"]
    assert float(tf.saved_model.load(export_dir).temperature.numpy()) == 1.0


def test_a_calibrated_export_serves_logits_and_softmax_of_logits_over_t(built):
    """probabilities = softmax(logits / T) with the T fitted on the validation split;
    logits are the in-memory model's pre-softmax values; the class is the same argmax."""
    _, model, graph_dir, _, calibrated_dir, record = built
    loaded = tf.saved_model.load(calibrated_dir)
    temperature = float(loaded.temperature.numpy())
    assert record["calibrated"] and record["examples"] == 14 and record["logits"] == "logits"
    assert temperature == pytest.approx(record["temperature"], rel=1e-6)
    assert temperature != pytest.approx(1.0, abs=1e-3)   # a fit, not the default
    # T minimises the validation NLL, so the NLL cannot have grown.
    assert record["after"]["nll"] <= record["before"]["nll"] + 1e-9
    faces = _faces(6)
    for signature in ("serving_default", "serving_uint8", "explain"):
        outputs = loaded.signatures[signature](pixels=tf.constant(
            faces, tf.int32 if signature == "serving_default" else tf.uint8))
        logits = outputs["logits"].numpy()
        assert outputs["logits"].dtype == tf.float32 and logits.shape == (6, NUM_CLASSES)
        shifted = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
        np.testing.assert_allclose(outputs["probabilities"].numpy(),
                                   shifted / shifted.sum(axis=1, keepdims=True), atol=1e-6)
        raw = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(raw / raw.sum(axis=1, keepdims=True),
                                   _expected(model, graph_dir, faces), atol=TOLERANCE)
        np.testing.assert_array_equal(outputs["class_id"].numpy(), logits.argmax(axis=1))
