"""Trainer: the registered Keras 3 models (models.py) trained with tf.data and exported
with the transform graph and the contract's serving signatures (export.py).

The entry point is imported on first use (PEP 562) rather than here, so that models.py
alone can be imported where TensorFlow is absent (the GPU benchmark builds the models
under JAX)."""
from typing import Any

__all__ = ["run_trainer", "TrainerResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fer_pipeline.components.trainer import executor
        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
