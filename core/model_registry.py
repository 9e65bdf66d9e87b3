"""The one model registry: every model the pipeline trains (MODEL_REGISTRY: its builder,
default hyperparameters, smoke overrides, gate thresholds and tuning search space) and
every name a Keras file from outside may be imported under (IMPORTED_MODELS). Adding a
model is one entry here plus its builder function; the steps, CLI choices, gates and the
Kubeflow pipeline follow from it. Builders are named as "module:function" strings, so
reading the registry never imports Keras.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fer_pipeline.core.config_loading import (at_least, between, one_of, optional, positive,
                                              setting, weights_file)
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.search_space import Choice, Float, SearchSpace

__all__ = ["ModelConfig", "RegisteredModel", "MODEL_REGISTRY", "MODEL_NAMES", "ImportedModel",
           "IMPORTED_MODELS", "IMPORTED_NAMES", "registered_model"]


@dataclass
class ModelConfig:
    batch_size: int = setting(check=at_least(1), help="faces per training step")
    epochs: int = setting(check=at_least(1), help="passes over the training split")
    learning_rate: float = setting(check=positive, help="the optimizer's learning rate")
    early_stopping_patience: int = setting(0, check=at_least(0),
                                           help="0: no early stopping")
    max_train_examples: int = setting(0, check=at_least(0),
                                      help="0: all (smoke profile caps it)")
    # Used instead of learning_rate when a transfer model has no pretrained weights and
    # trains from random init (VGG16 with weights=none): 5e-4 diverged there, 1e-4 learnt.
    scratch_learning_rate: Optional[float] = setting(
        None, check=optional(positive), help="learning_rate when training from random init")
    # Transfer models only: "none" (random init), "imagenet" (downloads), or a local .h5.
    weights: str = setting("", check=weights_file,
                           help='transfer models: "none", "imagenet" or a local .h5')
    train_base: str = setting(
        "auto", check=one_of("auto", "true", "false"),
        help='"auto": frozen with pretrained weights, trained without; "true"; "false"')
    # Tunable (the registry's search_space): the notebook's architectures are width 1.0.
    dropout: float = setting(0.0, check=between(0, 0.9),
                             help="dropout after each hidden dense layer")
    width: float = setting(1.0, check=between(0.05, 4),
                           help="multiplier of the layers' widths (conv filters, dense units)")


@dataclass(frozen=True)
class RegisteredModel:
    """One trainable model: everything the pipeline needs to know about it, in one entry.

    `builder` is "module:function"; the function takes (ModelConfig, jit_compile=...) and
    returns a compiled Keras 3 model whose input is the Transform step's `image` feature.
    It is named, not imported, so reading the configuration never imports Keras.
    """
    builder: str
    defaults: ModelConfig
    min_accuracy: float                # the evaluation gate's threshold (default profile)
    smoke: dict = field(default_factory=dict)          # smoke-profile ModelConfig overrides
    smoke_min_accuracy: Optional[float] = None         # smoke-profile threshold
    description: str = ""
    # What the tune step may try (core/search_space.py): ModelConfig field -> range.
    search_space: SearchSpace = field(default_factory=dict)


# The models the pipeline trains, evaluates and pushes. Adding a model is one entry here
# (plus its builder function); steps, CLI choices, gates and the KFP pipeline follow.
MODEL_REGISTRY: dict[str, RegisteredModel] = {
    "cnn": RegisteredModel(
        builder="fer_pipeline.components.trainer.models:build_cnn",
        defaults=ModelConfig(batch_size=70, epochs=115, learning_rate=2e-4,
                             early_stopping_patience=40, dropout=0.5),
        min_accuracy=0.5,
        # The notebook CNN (no batch norm, dropout 0.5) sits at chance for ~150 steps
        # before it learns; small batches buy the most steps for the CPU time.
        smoke={"epochs": 5, "batch_size": 32, "learning_rate": 1e-3,
               "early_stopping_patience": 3, "max_train_examples": 3000},
        smoke_min_accuracy=0.3,
        description="the notebook's CNN: 4 x (conv 3x3, max-pool), dense 256-128",
        search_space={"learning_rate": Float(1e-4, 3e-3, log=True),
                      "dropout": Choice((0.2, 0.35, 0.5)), "width": Choice((0.5, 1.0)),
                      "batch_size": Choice((32, 70))}),
    "vgg16": RegisteredModel(
        builder="fer_pipeline.components.trainer.models:build_vgg16",
        defaults=ModelConfig(batch_size=65, epochs=25, learning_rate=5e-4,
                             scratch_learning_rate=1e-4, weights="none"),
        min_accuracy=0.3,
        # From random init (the offline default) VGG16 stays at chance for far longer than
        # any smoke budget on CPU (measured: 2 epochs of 640 faces, 2 min 48 s on a 2-core
        # AVX2 machine, still at chance), so no smoke budget buys it accuracy: the smoke
        # profile trains it the least that still runs every step (train, export, evaluate,
        # gate), one batch. The smoke gate still demands it beat the majority-class baseline.
        smoke={"epochs": 1, "batch_size": 32, "max_train_examples": 32},
        smoke_min_accuracy=0.0,
        description="the notebook's VGG16 transfer model (1x1 conv to RGB, VGG16 base, "
                    "dense 4096-4096)",
        # width scales the dense head only: the VGG16 base is keras.applications'.
        search_space={"learning_rate": Float(3e-5, 1e-3, log=True),
                      "dropout": Choice((0.0, 0.3, 0.5)), "width": Choice((0.25, 0.5, 1.0)),
                      "batch_size": Choice((32, 65))}),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_REGISTRY)


@dataclass(frozen=True)
class ImportedModel:
    """A name `fer-pipeline import-model` may give a Keras file trained outside the pipeline
    (components/model_importer.py); from there it is evaluated, gated and pushed like a
    trained model. Adding a name is one entry here."""
    min_accuracy: float                # the evaluation gate's threshold
    description: str = ""


IMPORTED_MODELS: dict[str, ImportedModel] = {
    "cnn_notebook": ImportedModel(
        min_accuracy=0.5, description="the notebook's modelo_cnn.h5: the CNN on (48, 48, 1) "
        "pixels scaled by 1/255"),
    "vgg_notebook": ImportedModel(
        min_accuracy=0.3, description="the notebook's modelo_vgg.h5: VGG16 on (48, 48, 3) "
        "pixels scaled by 1/255"),
}
IMPORTED_NAMES: tuple[str, ...] = tuple(IMPORTED_MODELS)


def registered_model(name: str) -> RegisteredModel:
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {list(MODEL_NAMES)}")
    return MODEL_REGISTRY[name]
