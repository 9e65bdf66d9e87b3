"""Runs the trainer in a child process, for the tests that kill it mid-training or run
several workers: `python -m tests.trainer_child '<json>'`.

The json names `transform_dir`, `output_dir` and `train` (TrainConfig overrides), and
optionally `crash_after_epoch` (exit abruptly with CRASH_EXIT_CODE right after that epoch,
1-based, was checkpointed) and `exit_process` (end through core.errors.exit_process, as
the CLI does after tensorflow-io's S3 filesystem was used). The crash is a callback passed
to run_trainer: production code reads no test switch.
"""
from __future__ import annotations

import json
import os
import sys

from fer_pipeline.core import quiet

quiet.install()  # before TensorFlow loads, as the console scripts do

import keras  # noqa: E402

CRASH_EXIT_CODE = 3


class CrashAfterEpoch(keras.callbacks.Callback):
    """Exits the process right after epoch `epoch` (1-based) was checkpointed."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT_CODE)


def main(argv: list[str]) -> None:
    from fer_pipeline.components.trainer.executor import run_trainer
    from fer_pipeline.core.config import load_config

    args = json.loads(argv[1])
    config = load_config(overrides={"train": args["train"]}).train
    crash_after = args.get("crash_after_epoch")
    run_trainer(args["transform_dir"], args["output_dir"], config, "cnn",
                extra_callbacks=[CrashAfterEpoch(crash_after)] if crash_after else [])
    if args.get("exit_process"):
        from fer_pipeline.core.errors import exit_process

        exit_process(0)


if __name__ == "__main__":
    main(sys.argv)
