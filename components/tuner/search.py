"""One KerasTuner search over a registered model's search space (what every tuning
process runs: the only one, or the chief and each worker of a distributed search).

The model comes from the registry's builder string (core/model_registry.py), never by importing
the trainer: components stand alone. Trials train on the trainer's own input
(core/training_data.py make_dataset) at the batch size the trial drew.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import keras
import keras_tuner as kt

from fer_pipeline.core.config import ModelConfig, TuneConfig, registered_model
from fer_pipeline.core.contract import TRIALS_DIR
from fer_pipeline.core.search_space import Choice, Float, SearchSpace, apply
from fer_pipeline.core.training_data import (Targets, count_records, make_dataset, read_targets,
                                             split_pattern)

__all__ = ["OBJECTIVE", "SearchSettings", "builder_of", "fit_once", "make_tuner",
           "run_search"]

OBJECTIVE = "val_accuracy"
PROJECT = "search"     # KerasTuner's project directory under <output>/trials/


@dataclass
class SearchSettings:
    """Everything a tuning process needs, as plain data (it travels to worker processes
    as JSON)."""
    transform_dir: str
    output_dir: str
    model_name: str
    model_config: dict[str, Any]      # the model's ModelConfig, as the trainer would use it
    tune: dict[str, Any]              # TuneConfig
    shuffle_buffer: int
    seed: int

    @property
    def base(self) -> ModelConfig:
        return ModelConfig(**self.model_config)

    @property
    def tune_config(self) -> TuneConfig:
        return TuneConfig(**self.tune)

    @property
    def space(self) -> SearchSpace:
        return registered_model(self.model_name).search_space

    @property
    def max_examples(self) -> int:
        return self.tune_config.max_train_examples or self.base.max_train_examples


def builder_of(model_name: str) -> Callable[..., keras.Model]:
    """The registered builder function ("module:function" in the registry)."""
    module_name, function_name = registered_model(model_name).builder.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def head_of(targets: Targets) -> dict[str, Any]:
    """The builder's head arguments for FER+ data (8 classes, soft targets); none for
    FER-2013's seven labels, so a registered builder that knows only those keeps working."""
    if targets == Targets():
        return {}
    return {"num_classes": targets.num_classes, "soft_targets": targets.soft}


def _declare(hp: kt.HyperParameters, name: str, spec: Any) -> Any:
    if isinstance(spec, Float):
        return hp.Float(name, spec.low, spec.high, sampling="log" if spec.log else "linear")
    if isinstance(spec, Choice):
        return hp.Choice(name, list(spec.values))
    raise TypeError(f"unknown hyperparameter declaration {spec!r}")


class RegisteredHyperModel(kt.HyperModel):
    """Builds the registered model with a trial's values and fits it on the trainer's input."""

    def __init__(self, settings: SearchSettings):
        super().__init__(name=settings.model_name)
        self.settings = settings
        self._builder = builder_of(settings.model_name)
        self._counts: Optional[tuple[int, int]] = None
        self.targets = read_targets(settings.transform_dir)   # FER+'s classes and mode

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = {name: _declare(hp, name, spec)
                  for name, spec in self.settings.space.items()}
        # The same initial weights for the same values, whatever ran before in the process.
        keras.utils.set_random_seed(self.settings.seed)
        return self._builder(apply(self.settings.base, values), jit_compile=False,
                             **head_of(self.targets))

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args: Any, **kwargs: Any):
        batch_size = int(hp.values.get("batch_size", self.settings.base.batch_size))
        train_ds, val_ds = self.datasets(batch_size)
        kwargs.setdefault("verbose", 0)
        return model.fit(train_ds, validation_data=val_ds, shuffle=False, **kwargs)

    def datasets(self, batch_size: int):
        s = self.settings
        train_pattern = split_pattern(s.transform_dir, "train")
        val_pattern = split_pattern(s.transform_dir, "validation")
        if self._counts is None:
            train = count_records(train_pattern)
            self._counts = (min(train, s.max_examples) if s.max_examples else train,
                            count_records(val_pattern))
        train_count, val_count = self._counts
        train_ds = make_dataset(train_pattern, batch_size, training=True, seed=s.seed,
                                shuffle_buffer=s.shuffle_buffer, max_examples=s.max_examples,
                                num_examples=train_count, targets=self.targets)
        val_ds = make_dataset(val_pattern, batch_size, training=False, seed=s.seed,
                              num_examples=val_count, targets=self.targets)
        return train_ds, val_ds


def make_tuner(settings: SearchSettings) -> kt.Tuner:
    """The configured KerasTuner tuner, writing its trial records under <output>/trials/.

    In a distributed search every process makes the same tuner; KerasTuner's environment
    variables (KERASTUNER_TUNER_ID, _ORACLE_IP, _ORACLE_PORT) make one the chief.
    """
    tune = settings.tune_config
    common = dict(hypermodel=RegisteredHyperModel(settings),
                  objective=kt.Objective(OBJECTIVE, direction="max"), seed=tune.seed,
                  directory=os.path.join(settings.output_dir, TRIALS_DIR), project_name=PROJECT,
                  overwrite=False)
    if tune.tuner == "hyperband":
        return kt.Hyperband(max_epochs=tune.epochs_per_trial, factor=tune.hyperband_factor,
                            hyperband_iterations=1, **common)
    if tune.tuner == "bayesian":
        return kt.BayesianOptimization(max_trials=tune.max_trials,
                                       num_initial_points=min(2, tune.max_trials), **common)
    return kt.RandomSearch(max_trials=tune.max_trials, **common)


def run_search(settings: SearchSettings) -> None:
    """This process's part of the search (all of it, unless distributed)."""
    keras.utils.set_random_seed(settings.seed)
    tuner = make_tuner(settings)
    tuner.search(epochs=settings.tune_config.epochs_per_trial, verbose=0)


def fit_once(settings: SearchSettings) -> list[float]:
    """The declared defaults trained like one trial: the validation accuracy per epoch."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(settings.seed)
    hypermodel = RegisteredHyperModel(settings)
    model = builder_of(settings.model_name)(settings.base, jit_compile=False,
                                            **head_of(hypermodel.targets))
    train_ds, val_ds = hypermodel.datasets(settings.base.batch_size)
    history = model.fit(train_ds, validation_data=val_ds, epochs=settings.tune_config.epochs_per_trial,
                        shuffle=False, verbose=0)
    return [float(v) for v in history.history[OBJECTIVE]]


def settings_json(settings: SearchSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
