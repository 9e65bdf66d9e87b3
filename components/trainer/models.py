"""The seed notebook's two classifiers, as backend-agnostic Keras 3 models.

Both take the Transform step's `image` feature (2304 normalized floats) and return the
probabilities of the 7 FER-2013 classes. Only Keras layers are used (no tf ops), so the
same code runs under KERAS_BACKEND=tensorflow here and KERAS_BACKEND=jax on the GPU machine.

Shapes of the CNN with the notebook's default 'valid' padding (3x3 conv, then 2x2 pool):
48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4 -> 2 -> 1, so the fourth pool still has a 1x1x512 map
and 'same' padding is not needed; we keep 'valid' to match the notebook's parameter count.
VGG16's five pools take 48x48 down to 1x1x512 as well.

Under a mixed-precision global policy the hidden layers compute in float16/bfloat16; the
final softmax is pinned to float32 so probabilities (and the loss) stay numerically sound.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Optional

import keras
from keras import layers

from fer_pipeline.core.config import ModelConfig, TrainConfig, registered_model
from fer_pipeline.core.contract import IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS
from fer_pipeline.core.errors import ConfigError, MissingInputError

VGG_WEIGHTS_NONE = "none"
VGG_WEIGHTS_IMAGENET = "imagenet"

# The notebook's CNN: one 3x3 conv + 2x2 max-pool per block, widening 64 -> 512 (at
# width 1.0; ModelConfig.width scales every layer, the tune step searches it).
CNN_CONV_FILTERS: tuple[int, ...] = (64, 128, 256, 512)
CNN_DENSE_UNITS: tuple[int, ...] = (256, 128)
VGG_DENSE_UNITS: tuple[int, ...] = (4096, 4096)


def scaled(units: int, width: float) -> int:
    """A layer's width at `width` times the notebook's."""
    return max(1, round(units * width))


def build_cnn(config: ModelConfig, jit_compile: bool | str = "auto",
              num_classes: int = NUM_CLASSES, soft_targets: bool = False) -> keras.Model:
    """Input 2304 floats -> 4 x (Conv2D 3x3 relu, MaxPool 2x2) -> 256 -> 128 -> 7 softmax
    (the widths times config.width; dropout config.dropout, the notebook's 0.5).
    `num_classes` 8 for FER+ with contempt; `soft_targets`: trained on vote distributions."""
    inputs = keras.Input(shape=(NUM_PIXELS,), name="image")
    x = layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), name="to_grid")(inputs)
    for i, filters in enumerate(CNN_CONV_FILTERS, start=1):
        x = layers.Conv2D(scaled(filters, config.width), (3, 3), activation="relu",
                          name=f"conv{i}")(x)
        x = layers.MaxPooling2D((2, 2), name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(CNN_DENSE_UNITS, start=1):
        x = layers.Dense(scaled(units, config.width), activation="relu", name=f"dense{i}")(x)
        x = layers.Dropout(config.dropout, name=f"dropout{i}")(x)
    outputs = _classifier_head(x, num_classes)
    model = keras.Model(inputs, outputs, name="cnn")
    _compile(model, config, jit_compile, soft_targets)
    return model


def build_vgg16(config: ModelConfig, weights: Optional[str] = None,
                jit_compile: bool | str = "auto", train_base: Optional[str] = None,
                num_classes: int = NUM_CLASSES, soft_targets: bool = False) -> keras.Model:
    """Grey 48x48 -> 1x1 conv to 3 channels -> VGG16 base -> 4096 -> 4096 -> 7.

    `weights` (default: config.weights): "none" (random init, the offline default), "imagenet" (Keras downloads the
    file; only when the user asked for it), or the path of a local .h5 / .weights.h5 file
    holding weights of VGG16(include_top=False), e.g. a pre-downloaded ImageNet file.
    `train_base` (default: config.train_base): "false" freezes the base (the notebook's transfer learning), "true"
    trains it, "auto" freezes it only when pretrained weights were loaded. A frozen random
    base is a fixed random projection: measured on synthetic faces, the head then stays at
    chance accuracy, so without pretrained weights the whole network has to learn.
    """
    weights = (config.weights or VGG_WEIGHTS_NONE) if weights is None else weights
    train_base = config.train_base if train_base is None else train_base
    inputs = keras.Input(shape=(NUM_PIXELS,), name="image")
    x = layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), name="to_grid")(inputs)
    # A learned 1x1 conv maps grey to the 3 channels VGG16 expects (the notebook's choice).
    x = layers.Conv2D(3, (1, 1), name="grey_to_rgb")(x)
    base = build_vgg16_base(weights)
    base.trainable = vgg16_base_is_trainable(weights, train_base)
    if base.trainable and _is_random_init(weights) and config.scratch_learning_rate:
        config = dataclasses.replace(config, learning_rate=config.scratch_learning_rate)
    x = base(x, training=False)
    x = layers.Flatten(name="flatten")(x)
    # The head's width and dropout are tunable (the notebook's: width 1.0, no dropout).
    for i, units in enumerate(VGG_DENSE_UNITS, start=1):
        x = layers.Dense(scaled(units, config.width), activation="relu", name=f"dense{i}")(x)
        if config.dropout:
            x = layers.Dropout(config.dropout, name=f"dropout{i}")(x)
    outputs = _classifier_head(x, num_classes)
    model = keras.Model(inputs, outputs, name="vgg16")
    _compile(model, config, jit_compile, soft_targets)
    return model


def vgg16_base_is_trainable(weights: str, train_base: str = "auto") -> bool:
    if train_base not in ("auto", "true", "false"):
        raise ConfigError(f"train.models.vgg16.train_base must be auto, true or false, got {train_base!r}")
    if train_base == "auto":
        return _is_random_init(weights)
    return train_base == "true"


def _is_random_init(weights: str) -> bool:
    return weights in (VGG_WEIGHTS_NONE, "", None)


def build_vgg16_base(weights: str = VGG_WEIGHTS_NONE) -> keras.Model:
    """keras.applications.VGG16 without its top, at 48x48x3, with `weights` as above."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if weights == VGG_WEIGHTS_IMAGENET:
        return keras.applications.VGG16(include_top=False, weights="imagenet",
                                         input_shape=shape)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape)
    if _is_random_init(weights):
        _he_initialize(base)
        return base
    if not os.path.isfile(weights):
        raise MissingInputError(
            f"train.models.vgg16.weights={weights!r} is neither 'none', 'imagenet' nor an "
            f"existing file")
    if not weights.endswith(".h5"):
        raise ConfigError(f"train.models.vgg16.weights file must be .h5 or .weights.h5, got {weights!r}")
    base.load_weights(weights)
    return base


def _he_initialize(base: keras.Model) -> None:
    """Re-draws the conv kernels with He init.

    Keras' VGG16 uses Glorot init, which halves the signal's variance at every ReLU; after
    13 conv layers almost nothing reaches the head, so a from-scratch VGG16 cannot start
    learning. He init keeps the variance, as for any deep ReLU net trained from scratch.
    Unseeded, so keras.utils.set_random_seed governs it like every other initializer.
    """
    initializer = keras.initializers.HeNormal()
    for layer in base.layers:
        if isinstance(layer, layers.Conv2D):
            layer.kernel.assign(initializer(layer.kernel.shape))


def build_model(name: str, train_config: TrainConfig, jit_compile: bool | str = "auto",
                num_classes: int = NUM_CLASSES, soft_targets: bool = False) -> keras.Model:
    """Builds and compiles registered model `name` with its section of `train_config`.

    The builder comes from the model registry (core/model_registry.py, MODEL_REGISTRY).
    `jit_compile` goes to `model.compile` ("auto": Keras decides, i.e. XLA on accelerators);
    the trainer passes `train_config.xla`. `num_classes` and `soft_targets` come from the
    data (core/training_data.read_targets: FER+'s 8 classes, its vote distributions); they
    are passed only when they differ from FER-2013's, so a registered builder that knows
    only seven classes keeps working on FER-2013.
    """
    module_name, function_name = registered_model(name).builder.split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    head = {}
    if num_classes != NUM_CLASSES or soft_targets:
        head = {"num_classes": num_classes, "soft_targets": soft_targets}
    return builder(model_config(name, train_config), jit_compile=jit_compile, **head)


def model_config(name: str, train_config: TrainConfig) -> ModelConfig:
    """The ModelConfig section that belongs to model `name`."""
    registered_model(name)
    if name not in train_config.models:
        raise ConfigError(f"model {name!r} has no section in train.models")
    return train_config.models[name]


def _classifier_head(x, num_classes: int = NUM_CLASSES):
    # float32 even under a mixed policy: softmax and cross-entropy in half precision lose
    # small probabilities, and serving promises float32 probabilities.
    return layers.Dense(num_classes, activation="softmax", dtype="float32",
                        name="probabilities")(x)


def _compile(model: keras.Model, config: ModelConfig, jit_compile: bool | str = "auto",
             soft_targets: bool = False) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        # Soft targets (FER+ vote distributions) need the dense form; "accuracy" then
        # compares arg-maxes, i.e. accuracy against the majority.
        loss="categorical_crossentropy" if soft_targets else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
