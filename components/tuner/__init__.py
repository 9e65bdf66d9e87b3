"""Tuner: a KerasTuner search over each registered model's search space (search.py), run
in this process or by a chief and worker processes (distributed.py); its best values, or
the declared defaults when no trial beat them, go to `best_hyperparameters.json`, which
the train step uses.

The entry point is imported on first use (PEP 562), so declaring the pipeline does not
import KerasTuner or TensorFlow."""
from typing import Any

__all__ = ["run_tuner", "TunerResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fer_pipeline.components.tuner import executor
        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
