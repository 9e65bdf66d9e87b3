"""The two classifiers match the seed notebook's architectures and load local weights."""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from fer_pipeline.components.trainer.models import build_cnn, build_model, build_vgg16, build_vgg16_base
from fer_pipeline.core.config import ModelConfig, TrainConfig
from fer_pipeline.core.contract import NUM_CLASSES, NUM_PIXELS

# Computed by hand from the notebook's layers (3x3 convs with 'valid' padding at 48x48):
# 640 + 73,856 + 295,168 + 1,180,160 convs, 131,328 + 32,896 + 903 dense.
CNN_PARAMS = 1_714_951
VGG16_BASE_PARAMS = 14_714_688
# 1x1 conv (6) + 512*4096+4096 + 4096*4096+4096 + 4096*7+7.
VGG16_HEAD_PARAMS = 18_911_245

CONFIG = ModelConfig(batch_size=8, epochs=1, learning_rate=3e-4)
# dropout 0.5: the notebook's CNN, the registry's CNN default (width 1.0: its layer widths).
CNN_CONFIG = dataclasses.replace(CONFIG, dropout=0.5)


def _layer_summary(model: keras.Model) -> list[tuple]:
    rows = []
    for layer in model.layers[1:]:
        row = [type(layer).__name__]
        if isinstance(layer, keras.layers.Conv2D):
            row += [layer.filters, layer.kernel_size, layer.padding,
                    keras.activations.serialize(layer.activation)]
        elif isinstance(layer, keras.layers.Dense):
            row += [layer.units, keras.activations.serialize(layer.activation)]
        elif isinstance(layer, keras.layers.MaxPooling2D):
            row += [layer.pool_size]
        elif isinstance(layer, keras.layers.Dropout):
            row += [layer.rate]
        rows.append(tuple(row))
    return rows


def test_cnn_matches_the_notebook():
    model = build_cnn(CNN_CONFIG)
    def conv(filters):
        return ("Conv2D", filters, (3, 3), "valid", "relu")

    pool = ("MaxPooling2D", (2, 2))
    assert _layer_summary(model) == [
        ("Reshape",),
        conv(64), pool, conv(128), pool, conv(256), pool, conv(512), pool,
        ("Flatten",),
        ("Dense", 256, "relu"), ("Dropout", 0.5),
        ("Dense", 128, "relu"), ("Dropout", 0.5),
        ("Dense", NUM_CLASSES, "softmax"),
    ]
    assert model.count_params() == CNN_PARAMS
    assert model.input_shape == (None, NUM_PIXELS)
    # The fourth 'valid' pool still sees a 2x2 map: 48-46-23-21-10-8-4-2-1.
    assert model.get_layer("pool4").output.shape == (None, 1, 1, 512)
    assert float(model.optimizer.learning_rate) == pytest.approx(CONFIG.learning_rate)
    probs = model.predict(np.random.default_rng(0).normal(size=(3, NUM_PIXELS)), verbose=0)
    assert probs.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_vgg16_matches_the_notebook_and_freezes_its_base():
    model = build_vgg16(CONFIG, weights="none", train_base="false")
    assert [type(layer).__name__ for layer in model.layers[1:]] == [
        "Reshape", "Conv2D", "Functional", "Flatten", "Dense", "Dense", "Dense"]
    base = model.layers[3]
    assert base.name == "vgg16" and not base.trainable
    assert model.get_layer("grey_to_rgb").filters == 3
    assert model.get_layer("grey_to_rgb").kernel_size == (1, 1)
    assert [model.get_layer(n).units for n in ("dense1", "dense2", "probabilities")] == [
        4096, 4096, NUM_CLASSES]
    assert base.count_params() == VGG16_BASE_PARAMS
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == VGG16_HEAD_PARAMS
    assert model.count_params() == VGG16_BASE_PARAMS + VGG16_HEAD_PARAMS
    assert float(model.optimizer.learning_rate) == pytest.approx(CONFIG.learning_rate)
    assert model.predict(np.zeros((2, NUM_PIXELS)), verbose=0).shape == (2, NUM_CLASSES)


def test_vgg16_loads_a_local_weights_file(tmp_path):
    keras.utils.set_random_seed(123)
    source = build_vgg16_base("none")
    path = str(tmp_path / "vgg16_notop.weights.h5")
    source.save_weights(path)

    keras.utils.set_random_seed(456)  # a different random init, overwritten by the file
    model = build_vgg16(CONFIG, weights=path)
    loaded = model.get_layer("vgg16").get_weights()
    expected = source.get_weights()
    assert len(loaded) == len(expected) == 26
    for got, want in zip(loaded, expected):
        np.testing.assert_array_equal(got, want)

    keras.utils.set_random_seed(456)
    unloaded = build_vgg16(CONFIG, weights="none").get_layer("vgg16").get_weights()
    assert not np.array_equal(unloaded[0], expected[0])


def test_vgg16_base_is_frozen_only_when_pretrained_weights_are_loaded(tmp_path):
    path = str(tmp_path / "vgg16_notop.weights.h5")
    build_vgg16_base("none").save_weights(path)
    assert not build_vgg16(CONFIG, weights=path).get_layer("vgg16").trainable
    from_scratch = build_vgg16(CONFIG, weights="none")
    assert from_scratch.get_layer("vgg16").trainable
    assert from_scratch.count_params() == sum(
        int(np.prod(w.shape)) for w in from_scratch.trainable_weights)
    assert build_vgg16(CONFIG, weights="none", train_base="true").get_layer("vgg16").trainable
    scratch = dataclasses.replace(CONFIG, scratch_learning_rate=1e-5)
    assert float(build_vgg16(scratch, weights="none").optimizer.learning_rate) == \
        pytest.approx(1e-5)
    assert float(build_vgg16(scratch, weights=path).optimizer.learning_rate) == \
        pytest.approx(CONFIG.learning_rate)
    with pytest.raises(ValueError, match="train_base"):
        build_vgg16(CONFIG, weights="none", train_base="maybe")


def test_random_vgg16_base_uses_he_init_so_the_signal_survives_13_relu_layers():
    keras.utils.set_random_seed(0)
    base = build_vgg16_base("none")
    images = np.random.default_rng(0).normal(size=(8, 48, 48, 3)).astype("float32")
    features = np.asarray(base.predict(images, verbose=0))
    # With Keras' default Glorot init the features are ~1e-3 of the input's scale and the
    # head cannot learn (measured); He init keeps them within an order of magnitude.
    assert features.std() > 0.1, features.std()
    conv = base.get_layer("block3_conv1")
    fan_in = int(np.prod(conv.kernel.shape[:-1]))
    assert np.asarray(conv.kernel).std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.1)


def test_vgg16_rejects_a_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16.weights"):
        build_vgg16(CONFIG, weights=str(tmp_path / "absent.h5"))


def test_build_model_dispatches_on_name_with_each_models_section():
    config = TrainConfig(models={"cnn": ModelConfig(batch_size=8, epochs=1, learning_rate=1e-3)})
    cnn = build_model("cnn", config)
    assert cnn.name == "cnn" and cnn.count_params() == CNN_PARAMS
    assert float(cnn.optimizer.learning_rate) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", config)


def test_softmax_stays_float32_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_cnn(CONFIG)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    out = model(np.zeros((2, NUM_PIXELS), np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
