"""Trainer: fits the CNN or the VGG16 model on the Transform step's output and exports it.

Input pipeline (tf.data, no Python generator): the transformed TFRecords are read with a
deterministic parallel interleave, parsed in vectorized batches, cached in memory after
the first epoch, shuffled per example with a seeded buffer, re-batched and prefetched.
Only the train and validation splits are read; the test split is left to the evaluator.

Distribution needs no code change: TF_CONFIG set -> MultiWorkerMirroredStrategy, more than
one GPU -> MirroredStrategy, otherwise the default strategy (CPU or the single GPU).
`batch_size` in the config is the global batch, split across replicas.

Preemption: BackupAndRestore checkpoints every epoch under <output_dir>/checkpoints and a
re-run with the same output directory resumes after the last finished epoch (the
pipeline's run_step keeps a training step's partial directory for that). The history and
early-stopping state are checkpointed alongside, so a resumed run reports every epoch and
still restores the best weights seen before the interruption.

Object stores: when `output_dir` is a URI (s3://, gs://) Keras writes into a local scratch
directory instead, and the trainer uploads: after every epoch the resumable state
(checkpoints/, training_log.csv, logs/), at the end the SavedModel, history.json and
training_info.json. A run that finds checkpoints under the URI downloads them first and
resumes exactly as it would from a local directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import keras
import tensorflow as tf

from fer_pipeline.core.training_data import (count_records, make_dataset, read_targets,
                                             shard_by_data, split_pattern)
from fer_pipeline.components.trainer.distribution import (current_task, is_multi_worker,
                                                          precision_policy, select_strategy,
                                                          work_around_keras_multi_worker_build,
                                                          worker_dir)
from fer_pipeline.components.trainer.models import build_model, model_config
from fer_pipeline.components.trainer.warm_start import warm_start
from fer_pipeline.core import fileio
from fer_pipeline.core.config import TrainConfig
from fer_pipeline.core.search_space import apply
from fer_pipeline.core.serving_export import export_serving_model
from fer_pipeline.core.contract import (BEST_HYPERPARAMETERS_FILE, TRANSFORM_GRAPH_DIR,
                                        SERVING_MODEL_DIR, CHECKPOINTS_DIR, LOGS_DIR,
                                        HISTORY_FILE, TRAINING_INFO_FILE)

__all__ = ["run_trainer", "TrainerResult"]

log = logging.getLogger(__name__)

CSV_LOG_FILE = "training_log.csv"
# Written into checkpoints/ after every epoch, next to BackupAndRestore's files.
EPOCH_LOG_FILE = "epochs.json"
BACKUP_METADATA_FILE = "training_metadata.json"  # BackupAndRestore's: the backed-up epoch
BEST_WEIGHTS_FILE = "best.weights.h5"
MONITOR = "val_accuracy"



@dataclass
class TrainerResult:
    model_name: str
    serving_model_dir: str
    history_path: str
    training_info_path: str
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    images_per_s: float
    train_examples: int
    validation_examples: int
    strategy: str
    num_replicas: int
    resumed_at_epoch: Optional[int] = None
    vgg_weights: Optional[str] = None
    # Where the tunable values came from: {"source": "config" | "tune", "values", "tuning"}.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    warm_start: Optional[dict[str, Any]] = None    # train.warm_start: what it started from
    # Temperature scaling on the validation split: T, NLL and ECE before/after (the
    # "calibration" of training_info.json; core/calibration.calibration_record).
    calibration: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_trainer(transform_dir: str, output_dir: str, config: TrainConfig, model_name: str,
                extra_callbacks: Sequence[keras.callbacks.Callback] = (),
                tuning_dir: Optional[str] = None, serving_root: str = "",
                report: Callable[[str], None] = log.info) -> TrainerResult:
    """Trains registered model `model_name` (e.g. "cnn") and exports it to output_dir/serving_model.

    `transform_dir` and `output_dir` may be URIs. Keras writes checkpoints, logs and the
    SavedModel into a local directory (see `_local_work_dir`); outputs on a URI are uploaded.
    `extra_callbacks` run after the trainer's own, once each epoch is checkpointed (and
    uploaded, for a URI). `tuning_dir`: a tune step's output, whose
    best_hyperparameters.json replaces the config's tunable values. With
    `config.warm_start` the model starts from the version of it served under
    `serving_root` when that fits (warm_start.py); `report` gets one line saying which.
    """
    # MultiWorkerMirroredStrategy must exist before any other TF op runs in the process.
    strategy = select_strategy()
    # A model must not depend on what this process ran before (the local runner trains
    # every model in one process; Kubeflow, one per pod). tf.data's shuffles take their
    # seeds from the global seed as it is when the dataset is built, so seed before that.
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    config, hyperparameters = _with_tuned_values(config, model_name, tuning_dir)
    section = model_config(model_name, config)
    fileio.register_filesystem(transform_dir)
    target_dir = worker_dir(output_dir)

    train_pattern = split_pattern(transform_dir, "train")
    val_pattern = split_pattern(transform_dir, "validation")
    train_count = count_records(train_pattern)
    if section.max_train_examples:
        train_count = min(train_count, section.max_train_examples)
    val_count = count_records(val_pattern)
    # FER-2013's 7 labels, or what ingest's FER+ votes ask for (classes, mode).
    targets = read_targets(transform_dir)

    # Replicas must all step together: drop a ragged last batch when there are several.
    drop_remainder = strategy.num_replicas_in_sync > 1
    train_ds = make_dataset(train_pattern, section.batch_size, training=True,
                            seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                            max_examples=section.max_train_examples,
                            drop_remainder=drop_remainder, num_examples=train_count,
                            targets=targets)
    val_ds = make_dataset(val_pattern, section.batch_size, training=False, seed=config.seed,
                          num_examples=val_count, targets=targets)
    # Temperature scaling fits on labels; with soft targets it takes each validation face's
    # most-voted class (serving_export.fit_module_temperature), which is the stored majority.
    # Kept unsharded: every worker fits on the whole split.
    calibration_ds = val_ds
    if is_multi_worker():
        train_ds, val_ds = (shard_by_data(ds) for ds in (train_ds, val_ds))

    with _local_work_dir(target_dir) as work_dir:
        policy = precision_policy(config.mixed_precision)
        previous_policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(policy)
        try:
            # Re-seeded so initial weights do not depend on what building the datasets drew.
            keras.utils.set_random_seed(config.seed)
            with strategy.scope():
                model = build_model(model_name, config, jit_compile=config.xla,
                                    num_classes=targets.num_classes,
                                    soft_targets=targets.soft)
            if is_multi_worker():
                work_around_keras_multi_worker_build(model, strategy)
            started_from = None
            if config.warm_start:
                started_from = warm_start(model, model_name, serving_root)
                report(started_from["summary"])
            recorder = EpochRecorder(os.path.join(work_dir, CHECKPOINTS_DIR), train_count)
            upload = [UploadTrainingState(work_dir, target_dir)] if work_dir != target_dir else []
            callbacks = _callbacks(work_dir, section.early_stopping_patience, recorder,
                                   [*upload, *extra_callbacks])
            model.fit(train_ds, validation_data=val_ds, epochs=section.epochs,
                      callbacks=callbacks, verbose=2, shuffle=False)  # tf.data shuffles
            # Temperature scaling on the validation split (core/calibration.py): the
            # export serves softmax(logits / T) and the fitted T with its before/after.
            calibration = export_serving_model(
                model, fileio.join(transform_dir, TRANSFORM_GRAPH_DIR),
                os.path.join(work_dir, SERVING_MODEL_DIR), calibration_batches=calibration_ds)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

        history = recorder.summary()
        history["stopped_early"] = len(recorder.records) < section.epochs
        # Early stopping restores the best epoch's weights; without it the last epoch is saved.
        history["exported_epoch"] = (history["best_epoch"] if section.early_stopping_patience > 0
                                     else history["epochs_run"])
        fileio.write_json(os.path.join(work_dir, HISTORY_FILE), history)
        vgg_weights = section.weights or None  # transfer models only
        info = {
            "model_name": model_name,
            "vgg_weights": vgg_weights,
            "config": dataclasses.asdict(config),
            "model_config": dataclasses.asdict(section),
            "strategy": type(strategy).__name__,
            "num_replicas": strategy.num_replicas_in_sync,
            "task": current_task(),
            "train_examples": train_count,
            "validation_examples": val_count,
            "precision_policy": policy,
            "jit_compile": config.xla,
            "keras_backend": keras.backend.backend(),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "python": sys.version.split()[0]},
            "transform_dir": transform_dir,
            "hyperparameters": hyperparameters,
            "warm_start": started_from,
            "calibration": calibration,
            "targets": {"num_classes": targets.num_classes, "target": targets.target,
                        "ferplus": targets.ferplus},
        }
        fileio.write_json(os.path.join(work_dir, TRAINING_INFO_FILE), info)
        if calibration.get("calibrated"):
            log.info("%s: temperature %.3f fitted on %d validation faces (ECE %.3f -> %.3f)",
                     model_name, calibration["temperature"], calibration["examples"],
                     calibration["before"]["ece"], calibration["after"]["ece"])
        if work_dir != target_dir:
            upload_outputs(work_dir, target_dir)
    return TrainerResult(
        model_name=model_name,
        serving_model_dir=fileio.join(target_dir, SERVING_MODEL_DIR),
        history_path=fileio.join(target_dir, HISTORY_FILE),
        training_info_path=fileio.join(target_dir, TRAINING_INFO_FILE),
        epochs_run=history["epochs_run"], best_epoch=history["best_epoch"],
        best_val_accuracy=history["best_val_accuracy"], images_per_s=history["images_per_s"],
        train_examples=train_count, validation_examples=val_count,
        strategy=info["strategy"], num_replicas=info["num_replicas"],
        resumed_at_epoch=history["resumed_at_epoch"], vgg_weights=vgg_weights,
        hyperparameters=hyperparameters, warm_start=started_from, calibration=calibration)


def _with_tuned_values(config: TrainConfig, model_name: str, tuning_dir: Optional[str]
                       ) -> tuple[TrainConfig, dict[str, Any]]:
    """`config` with the tune step's chosen values for `model_name`, and where they came
    from (the record training_info.json keeps)."""
    section = model_config(model_name, config)
    path = fileio.join(tuning_dir, BEST_HYPERPARAMETERS_FILE) if tuning_dir else ""
    if not path or not fileio.exists(path):
        return config, {"source": "config"}
    chosen = fileio.read_json(path)
    tuned = apply(section, chosen["hyperparameters"])
    return (dataclasses.replace(config, models={**config.models, model_name: tuned}),
            {"source": "tune", "values": chosen["hyperparameters"],
             "tuning": tuning_dir, "found_by": chosen.get("source"),
             "summary": chosen.get("summary")})


# ----------------------------------------------------------------- outputs on a URI

# What a resumed run needs from a killed one: the backups and epoch records, the CSV log
# (appended to) and the TensorBoard logs (continued).
RESUMABLE_STATE = (CHECKPOINTS_DIR, CSV_LOG_FILE, LOGS_DIR)
# Inside checkpoints/: the files that say which epoch the weights belong to go last, so
# a reader never finds a record of an epoch whose weights are not there yet.
CHECKPOINT_RECORDS = (BACKUP_METADATA_FILE, EPOCH_LOG_FILE)


@contextlib.contextmanager
def _local_work_dir(target_dir: str) -> Iterator[str]:
    """The directory Keras writes to: `target_dir` itself when it is local, else a scratch
    directory seeded with the resumable state a killed run left under the URI.

    Keras' BackupAndRestore, TensorBoard and tf.saved_model.save each write many small
    files, rewrite some and (checkpoints) read them back; on an object store that is slow
    and some S3 servers return bad ranged reads of just-written checkpoints, so only
    finished files are uploaded.
    """
    with fileio.local_directory(target_dir, "fer-train-") as work_dir:
        if work_dir != target_dir:
            download_resumable_state(target_dir, work_dir)
        yield work_dir


def download_resumable_state(target_dir: str, work_dir: str) -> list[str]:
    """Copies what a killed run uploaded (checkpoints, logs) into `work_dir`."""
    found = []
    for name in RESUMABLE_STATE:
        source = fileio.join(target_dir, name)
        if not fileio.exists(source):
            continue
        if fileio.isdir(source):
            fileio.copytree(source, os.path.join(work_dir, name))
        else:
            fileio.copy_file(source, os.path.join(work_dir, name))
        found.append(name)
    if found:
        log.info("resuming from the training state under %s: %s", target_dir, found)
    return found


def upload_training_state(work_dir: str, target_dir: str) -> None:
    """Uploads the resumable state, so a run killed after this can resume from here."""
    for name in RESUMABLE_STATE:
        local = os.path.join(work_dir, name)
        if os.path.isdir(local):
            last = CHECKPOINT_RECORDS if name == CHECKPOINTS_DIR else ()
            fileio.copytree(local, fileio.join(target_dir, name), last=last)
        elif os.path.exists(local):
            fileio.copy_file(local, fileio.join(target_dir, name))


def upload_outputs(work_dir: str, target_dir: str) -> None:
    """Uploads the finished run; the SavedModel, history and info go up after the rest."""
    upload_training_state(work_dir, target_dir)
    if not os.path.exists(os.path.join(work_dir, CHECKPOINTS_DIR)):
        # BackupAndRestore deletes its backup when training finishes; a finished run
        # leaves nothing to resume from on the URI either.
        fileio.rmtree(fileio.join(target_dir, CHECKPOINTS_DIR))
    fileio.copytree(os.path.join(work_dir, SERVING_MODEL_DIR),
                    fileio.join(target_dir, SERVING_MODEL_DIR))
    for name in (HISTORY_FILE, TRAINING_INFO_FILE):
        fileio.copy_file(os.path.join(work_dir, name), fileio.join(target_dir, name))


class UploadTrainingState(keras.callbacks.Callback):
    """After every epoch's checkpoint: uploads the resumable state to the output URI."""

    def __init__(self, work_dir: str, target_dir: str):
        super().__init__()
        self.work_dir = work_dir
        self.target_dir = target_dir

    def on_epoch_end(self, epoch, logs=None):
        upload_training_state(self.work_dir, self.target_dir)


# ------------------------------------------------------------------------- callbacks

def _callbacks(work_dir: str, patience: int, recorder: "EpochRecorder",
               after_checkpoint: list[keras.callbacks.Callback]
               ) -> list[keras.callbacks.Callback]:
    checkpoints = os.path.join(work_dir, CHECKPOINTS_DIR)
    # Order matters: the backup is written first, then the records that describe it, so a
    # kill in between loses at most the description of an epoch that will be re-run.
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(checkpoints),
        recorder,
        keras.callbacks.CSVLogger(os.path.join(work_dir, CSV_LOG_FILE), append=True),
        keras.callbacks.TensorBoard(os.path.join(work_dir, LOGS_DIR)),
    ]
    if patience > 0:
        callbacks.append(ResumableEarlyStopping(
            recorder, os.path.join(checkpoints, BEST_WEIGHTS_FILE), patience=patience))
    # Uploads run once every file of the epoch is written (the best weights included).
    callbacks.extend(after_checkpoint)
    return callbacks


class EpochRecorder(keras.callbacks.Callback):
    """Per-epoch metrics and training throughput, persisted so they survive a resume."""

    def __init__(self, checkpoint_dir: str, train_examples: int):
        super().__init__()
        self.path = os.path.join(checkpoint_dir, EPOCH_LOG_FILE)
        self.train_examples = train_examples
        self.records: list[dict[str, Any]] = []
        if os.path.exists(self.path):
            self.records = json.loads(open(self.path).read())
        self.resumed_at_epoch: Optional[int] = None
        self._first_epoch_seen = False
        self._epoch_start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            # Keep only epochs whose weights the restored checkpoint already contains.
            self.records = [r for r in self.records if r["epoch"] <= epoch]
            self.resumed_at_epoch = epoch + 1 if epoch > 0 else None
        self._epoch_start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        # Validation runs inside the epoch; the throughput counts training steps only.
        if not self._train_end:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._epoch_start
        record = {"epoch": epoch + 1, "seconds": round(now - self._epoch_start, 3),
                  "train_seconds": round(train_seconds, 3),
                  "images_per_s": round(self.train_examples / max(train_seconds, 1e-9), 1)}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        self.records.append(record)
        fileio.write_json(self.path, self.records)

    def summary(self) -> dict[str, Any]:
        records = self.records
        best = max(records, key=lambda r: r.get(MONITOR, float("-inf"))) if records else {}
        # The first epoch of a process also traces the model and fills the data cache.
        steady = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"]
                                                               for r in records]
        return {
            "epochs": records,
            "epochs_run": len(records),
            "best_epoch": int(best.get("epoch", 0)),
            "best_val_accuracy": float(best.get(MONITOR, float("nan"))),
            "images_per_s": float(statistics.median(steady)) if steady else 0.0,
            "resumed_at_epoch": self.resumed_at_epoch,
            "monitor": MONITOR,
        }


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on val_accuracy whose best weights and patience survive a resume."""

    def __init__(self, recorder: EpochRecorder, best_weights_path: str, patience: int):
        super().__init__(monitor=MONITOR, mode="max", patience=patience,
                         restore_best_weights=True, verbose=1)
        self.recorder = recorder
        self.best_weights_path = best_weights_path
        self._restored = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._restored:
            return
        self._restored = True
        previous = [r for r in self.recorder.records if MONITOR in r]
        if epoch == 0 or not previous or not os.path.exists(self.best_weights_path):
            return
        best = max(previous, key=lambda r: r[MONITOR])
        self.best = best[MONITOR]
        self.best_epoch = best["epoch"] - 1
        self.wait = previous[-1]["epoch"] - best["epoch"]
        current = self.model.get_weights()
        self.model.load_weights(self.best_weights_path)
        self.best_weights = self.model.get_weights()
        self.model.set_weights(current)
        log.info("resumed early stopping: best %s %.4f at epoch %d, waited %d",
                 MONITOR, self.best, best["epoch"], self.wait)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.best_epoch == epoch:  # this epoch is the new best: keep it on disk too
            self.model.save_weights(self.best_weights_path, overwrite=True)

