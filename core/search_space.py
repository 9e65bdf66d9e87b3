"""Hyperparameter search spaces, declared beside each model in the registry (core/model_registry.py).

A space maps fields of `ModelConfig` (learning_rate, dropout, width, batch_size...) to the
values the tune step may try. It is plain data here, so reading the configuration never
imports KerasTuner; the tuner (components/tuner/) turns it into KerasTuner hyperparameters,
and `apply` turns a trial's values (or `best_hyperparameters.json`) back into the
`ModelConfig` the model's builder and the training input take.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Union

__all__ = ["Float", "Choice", "Hyperparameter", "SearchSpace", "TUNABLE", "apply",
           "declared_values", "describe"]


@dataclass(frozen=True)
class Float:
    """Any value in [low, high]; `log`: sampled evenly in log scale (learning rates)."""
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.low >= self.high or (self.log and self.low <= 0):
            raise ValueError(f"Float({self.low}, {self.high}, log={self.log}) is not a range")


@dataclass(frozen=True)
class Choice:
    """One of `values` (ints or floats)."""
    values: tuple[Union[int, float], ...]

    def __post_init__(self) -> None:
        if not self.values or len(set(self.values)) != len(self.values):
            raise ValueError(f"Choice{self.values} needs distinct values")


Hyperparameter = Union[Float, Choice]
SearchSpace = Mapping[str, Hyperparameter]

# The ModelConfig fields a space may name. learning_rate also sets scratch_learning_rate
# when a model has one: the tuner measured the rate the model actually trained with.
TUNABLE = ("learning_rate", "dropout", "width", "batch_size")


def apply(config: Any, values: Mapping[str, Any]) -> Any:
    """`config` (a ModelConfig) with the tuned `values` in place of its own."""
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise ValueError(f"not tunable: {unknown}; tunable fields are {list(TUNABLE)}")
    changes = {name: (int(value) if name == "batch_size" else float(value))
               for name, value in values.items()}
    if "learning_rate" in changes and getattr(config, "scratch_learning_rate", None):
        changes["scratch_learning_rate"] = changes["learning_rate"]
    return dataclasses.replace(config, **changes)


def declared_values(config: Any, space: SearchSpace) -> dict[str, Any]:
    """The values `config` (a ModelConfig) declares for each field of `space`: the
    defaults a search has to beat."""
    return {name: getattr(config, name) for name in space}


def describe(space: SearchSpace) -> dict[str, Any]:
    """The space as JSON-able data (cache keys, manifests, the tuning record)."""
    return {name: {"type": type(hp).__name__.lower(), **dataclasses.asdict(hp)}
            for name, hp in space.items()}
