"""Tuner: searches a registered model's hyperparameters and writes the values `train` uses.

The search (search.py) runs KerasTuner's random, Bayesian or Hyperband search over the
model's search space (core/model_registry.py MODEL_REGISTRY), each trial trained on the trainer's
own input for `tune.epochs_per_trial` epochs and scored by its best validation accuracy.
The declared defaults are then trained the same way: only a trial that beats them is
kept. `best_hyperparameters.json` holds the chosen values either way (the defaults, saying
so, when nothing beat them); `trials/` holds KerasTuner's own records of every trial.

Object stores: KerasTuner writes local files, so for a URI output the search runs in a
local scratch directory that is uploaded at the end.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fer_pipeline.components.tuner.distributed import run_distributed
from fer_pipeline.components.tuner.search import (OBJECTIVE, PROJECT, SearchSettings, fit_once,
                                                  run_search)
from fer_pipeline.core import fileio
from fer_pipeline.core.config import TrainConfig, TuneConfig, registered_model
from fer_pipeline.core.contract import BEST_HYPERPARAMETERS_FILE, TRIALS_DIR
from fer_pipeline.core.errors import ConfigError
from fer_pipeline.core.search_space import declared_values, describe

__all__ = ["run_tuner", "TunerResult"]


@dataclass
class TunerResult:
    model_name: str
    tuner: str
    trials: int                       # completed trials
    workers: int                      # 0: the search ran in this process
    source: str                       # "search" (a trial won) or "defaults"
    hyperparameters: dict[str, Any]   # what train will use
    best_trial: Optional[str]
    best_val_accuracy: float          # the best trial's
    default_val_accuracy: float       # the declared defaults', trained like a trial
    seconds: float
    summary: str
    best_hyperparameters_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_tuner(transform_dir: str, output_dir: str, tune: TuneConfig, train: TrainConfig,
              model_name: str, workers: Optional[int] = None,
              report: Callable[[str], None] = lambda line: None) -> TunerResult:
    """Tunes registered model `model_name` on the Transform output in `transform_dir`.

    `workers` (default: tune.workers): 0 searches in this process, N runs a chief and N
    worker processes. `report` gets one line when the search is over.
    """
    started = time.time()
    space = registered_model(model_name).search_space
    if not space:
        raise ConfigError(f"model {model_name!r} declares no search_space in the registry "
                          "(core/config.py): nothing to tune")
    if model_name not in train.models:
        raise ConfigError(f"model {model_name!r} has no section in train.models")
    workers = tune.workers if workers is None else workers
    base = train.models[model_name]
    fileio.register_filesystem(transform_dir)
    with fileio.local_directory(output_dir, "fer-tune-") as work_dir:
        settings = SearchSettings(transform_dir=transform_dir, output_dir=work_dir,
                                  model_name=model_name, model_config=dataclasses.asdict(base),
                                  tune=dataclasses.asdict(tune),
                                  shuffle_buffer=train.shuffle_buffer, seed=tune.seed)
        if workers:
            run_distributed(settings, workers)
        else:
            run_search(settings)
        trials = completed_trials(work_dir, list(space))
        if not trials:
            raise RuntimeError(f"the {tune.tuner} search of {model_name} completed no trial; "
                               f"see {os.path.join(work_dir, TRIALS_DIR)}")
        default_curve = fit_once(settings)
        defaults = declared_values(base, space)
        default_score = max(default_curve)
        best = max(trials, key=lambda t: (t["score"], -int(t["trial_id"])))
        if best["score"] > default_score:
            source, values = "search", best["values"]
            summary = (f"{model_name}: trial {best['trial_id']} of {len(trials)} beat the "
                       f"declared defaults, val accuracy {best['score']:.3f} vs "
                       f"{default_score:.3f}: {_format(values)}")
        else:
            source, values = "defaults", defaults
            summary = (f"{model_name}: no trial of {len(trials)} beat the declared defaults "
                       f"(best {best['score']:.3f} vs {default_score:.3f}); keeping the "
                       f"defaults: {_format(values)}")
        _drop_checkpoints(work_dir)
        record = {
            "model": model_name, "source": source, "hyperparameters": values,
            "summary": summary, "tuner": tune.tuner, "objective": OBJECTIVE,
            "best_trial": {"trial_id": best["trial_id"], "val_accuracy": best["score"],
                           "hyperparameters": best["values"]},
            "defaults": {"hyperparameters": defaults, "val_accuracy": default_score,
                         "val_accuracy_per_epoch": default_curve},
            "trials": trials, "search_space": describe(space),
            "budget": {"max_trials": tune.max_trials, "epochs_per_trial": tune.epochs_per_trial,
                       "max_train_examples": settings.max_examples, "workers": workers},
        }
        fileio.write_json(os.path.join(work_dir, BEST_HYPERPARAMETERS_FILE), record)
        if work_dir != output_dir:
            fileio.copytree(work_dir, output_dir)
    report(summary)
    return TunerResult(
        model_name=model_name, tuner=tune.tuner, trials=len(trials), workers=workers,
        source=source, hyperparameters=values, best_trial=best["trial_id"],
        best_val_accuracy=best["score"], default_val_accuracy=default_score,
        seconds=round(time.time() - started, 1), summary=summary,
        best_hyperparameters_path=fileio.join(output_dir, BEST_HYPERPARAMETERS_FILE))


def completed_trials(work_dir: str, names: list[str]) -> list[dict[str, Any]]:
    """KerasTuner's completed trial records: id, score and the searched values (Hyperband's
    bookkeeping values left out), in trial order."""
    trials = []
    pattern = os.path.join(work_dir, TRIALS_DIR, PROJECT, "trial_*", "trial.json")
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            trial = json.load(f)
        if trial.get("status") != "COMPLETED" or trial.get("score") is None:
            continue
        values = trial["hyperparameters"]["values"]
        trials.append({"trial_id": trial["trial_id"], "score": float(trial["score"]),
                       "values": {name: values[name] for name in names if name in values},
                       "epochs": values.get("tuner/epochs")})
    return trials


def _drop_checkpoints(work_dir: str) -> None:
    # Each trial's best weights are only for Hyperband's next rounds; the records stay.
    for path in glob.glob(os.path.join(work_dir, TRIALS_DIR, "**", "*.weights.h5"),
                          recursive=True):
        os.remove(path)


def _format(values: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in values.items())
