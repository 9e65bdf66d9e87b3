"""How the Trainer distributes: TF_CONFIG set -> MultiWorkerMirroredStrategy, more than one
GPU -> MirroredStrategy, otherwise the default strategy; where each worker writes; the
mixed-precision policy; and the work-arounds Keras 3 needs under multi-worker training.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import keras
import tensorflow as tf

from fer_pipeline.core import fileio

__all__ = ["WORKERS_DIR", "current_task", "is_multi_worker", "precision_policy", "select_strategy",
           "work_around_keras_multi_worker_build", "worker_dir"]

WORKERS_DIR = "workers"


def select_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored under TF_CONFIG, Mirrored on >1 GPU, else the default."""
    if is_multi_worker():
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def work_around_keras_multi_worker_build(model: keras.Model,
                                          strategy: tf.distribute.Strategy) -> None:
    """Lets Keras 3 fit() start under MultiWorkerMirroredStrategy.

    Keras 3 (keras-team/keras#20585, open as of 3.15) builds the model symbolically from
    the first batch by `strategy.reduce("MEAN", (x, y, sample_weight))`, which
    MultiWorkerMirroredStrategy cannot do on a tuple. The build only needs the batch's
    shapes and dtypes, so this instance-level override builds from one replica's share.
    """
    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = next(it)
                break
        data_batch = tf.nest.map_structure(
            lambda v: (strategy.experimental_local_results(v)[0]
                       if isinstance(v, tf.distribute.DistributedValues) else v),
            data_batch)
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build
    _patch_keras_multi_worker_reduce()


def _patch_keras_multi_worker_reduce() -> None:
    """Second half of the keras#20585 workaround, for this (multi-worker) process only.

    Keras averages each step's logs across workers with `strategy.reduce(..., axis=0)`,
    which fails on the scalar loss and metrics. Averaging them over all replicas
    (axis=None) is what was meant, and gives every worker the same logs, so callbacks
    such as EarlyStopping take the same decision everywhere.
    """
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    original = getattr(keras_tf_trainer.reduce_per_replica, "__wrapped__",
                       keras_tf_trainer.reduce_per_replica)

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not isinstance(
                strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return original(values, strategy, reduction)
        return tf.nest.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None), values)

    reduce_per_replica.__wrapped__ = original
    keras_tf_trainer.reduce_per_replica = reduce_per_replica


def _tf_config() -> dict[str, Any]:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def is_multi_worker() -> bool:
    cluster = _tf_config().get("cluster", {})
    return sum(len(tasks) for tasks in cluster.values()) > 1


def current_task() -> Optional[dict[str, Any]]:
    return _tf_config().get("task") if is_multi_worker() else None


def worker_dir(output_dir: str) -> str:
    """The chief writes to output_dir; other workers to output_dir/workers/<type>-<index>.

    Every worker must checkpoint and save (the collectives need all of them), but on a
    shared filesystem they must not overwrite the chief's files.
    """
    task = current_task()
    if not task:
        return output_dir
    cluster = _tf_config()["cluster"]
    task_type, index = task["type"], int(task["index"])
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0
                                        and "chief" not in cluster)
    return output_dir if is_chief else fileio.join(output_dir, WORKERS_DIR,
                                                    f"{task_type}-{index}")


def precision_policy(mixed_precision: bool) -> str:
    if not mixed_precision:
        return "float32"
    # float16 needs loss scaling but is what GPU tensor cores do fastest; CPUs have bf16.
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
