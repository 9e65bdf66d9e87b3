"""How fast the smoke CNN learns, in training steps and images (not seconds, which depend on
the machine's load): validation accuracy every --every steps of one training setting.

Used to choose the smoke profile's CNN budget (docs/benchmarks.md, "The smoke CNN's
learning curve"). The data is the demo's, prepared in memory the way the pipeline's data
half prepares it, so one setting takes minutes instead of a pipeline run:
  - `fer-pipeline synth`'s generator (fer_pipeline.pipeline.synthetic, same seed as the demo),
    Usage Training -> train, PublicTest -> validation;
  - the augment step's class balancing (fer_pipeline.components.augment: every class topped up to the
    largest with its deterministic flipped/rotated/shifted copies);
  - the trainer's `max_train_examples` cap (a seeded random subset of the augmented split);
  - the transform step's z-score with the training split's mean and std.
The model is `fer_pipeline.components.trainer.models.build_cnn` (the notebook's CNN, Keras' default Glorot
kernels) with the given batch size and learning rate. Two diagnostics that are not
settings of the product: `--init he` re-draws its kernels with He init (what VGG16's
random base uses, components/trainer/models.py), `--dropout R` replaces the notebook's 0.5.

    .venv/bin/python benchmarks/learning_curve.py [--rows 4000] [--batch 32] [--lr 1e-3]
        [--steps 300] [--every 25] [--init glorot|he] [--dropout R] [--threads N]

Prints one line per evaluation and a final JSON line (`RESULT {...}`) with the curve.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="synthetic CSV rows (demo: 4000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (demo: 0)")
    parser.add_argument("--cap", type=int, default=3000, help="max_train_examples")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--init", choices=["glorot", "he"], default="glorot",
                        help="glorot: build_cnn as it is; he: kernels re-drawn with He init")
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout rate instead of the notebook's 0.5 (a diagnostic)")
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra-op threads (0: TF decides); 1 runs two settings side by side")
    args = parser.parse_args()
    if args.threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import numpy as np
    from fer_pipeline.components.trainer.models import build_cnn
    from fer_pipeline.core.config import ModelConfig

    x_train, y_train, x_val, y_val = demo_data(args.rows, args.seed, args.cap)
    keras.utils.set_random_seed(42)   # TrainConfig.seed
    model = build_cnn(ModelConfig(batch_size=args.batch, epochs=1, learning_rate=args.lr,
                                  dropout=0.5), jit_compile=False)   # the notebook's
    for layer in model.layers:
        if args.init == "he" and hasattr(layer, "kernel"):
            layer.kernel.assign(keras.initializers.HeNormal()(layer.kernel.shape))
        if args.dropout is not None and isinstance(layer, keras.layers.Dropout):
            layer.rate = args.dropout   # read when fit traces the training step
    # Epochs of reshuffled training faces, as the trainer's tf.data shuffle gives them.
    order = np.random.default_rng(1)
    epochs_needed = args.steps * args.batch // len(x_train) + 1
    stream = np.concatenate([order.permutation(len(x_train)) for _ in range(epochs_needed)])
    curve, started, taken = [], time.time(), 0
    for done in range(args.every, args.steps + 1, args.every):
        chosen = stream[taken: taken + args.every * args.batch]
        taken += len(chosen)
        model.fit(x_train[chosen], y_train[chosen], batch_size=args.batch, epochs=1,
                  verbose=0, shuffle=False)
        accuracy = float(model.evaluate(x_val, y_val, batch_size=256, verbose=0)[1])
        curve.append([done, done * args.batch, round(accuracy, 4)])
        print(f"step {done:5d}  images {done * args.batch:6d}  val_accuracy {accuracy:.3f}  "
              f"({time.time() - started:.0f} s)", flush=True)
    print("RESULT " + json.dumps({
        "settings": vars(args), "train_examples": len(x_train),
        "validation_examples": len(x_val), "curve [step, images, val_accuracy]": curve,
        "seconds": round(time.time() - started, 1)}))
    return 0


def demo_data(rows: int, seed: int, cap: int):
    """(train faces, labels, validation faces, labels): z-scored float32 [n, 2304], int."""
    import numpy as np
    from fer_pipeline.pipeline import synthetic
    from fer_pipeline.components.augment import augment_image, draw_params
    from fer_pipeline.core.config import AugmentConfig, TrainConfig

    rng = np.random.default_rng(seed)
    labels = synthetic._shuffled_labels(rows, rng)
    usage = synthetic._stratified_usage(labels, rng)
    faces = synthetic.draw_faces(labels, rng)
    train, validation = usage == "Training", usage == "PublicTest"
    x, y = faces[train], labels[train]
    counts = np.bincount(y, minlength=7)
    augment = AugmentConfig()
    copies, copy_labels = [], []
    for label in range(7):
        sources = np.flatnonzero(y == label)
        for copy in range(counts.max() - counts[label]):   # the augment step's plan
            source = int(sources[copy % len(sources)])
            params = draw_params(augment.seed, source, copy, augment)
            copies.append(augment_image(x[source], params))
            copy_labels.append(label)
    if copies:
        x, y = np.concatenate([x, np.stack(copies)]), np.concatenate([y, copy_labels])
    # The trainer's cap: a seeded random subset (its shuffle-then-take), not the first rows.
    subset = np.random.default_rng(TrainConfig().seed).permutation(len(x))[:cap or len(x)]
    mean, std = x.astype(np.float64).mean(), x.astype(np.float64).std()

    def zscore(images):
        flat = images.reshape(len(images), -1).astype(np.float64)
        return ((flat - mean) / std).astype(np.float32)

    return zscore(x[subset]), y[subset], zscore(faces[validation]), labels[validation]


if __name__ == "__main__":
    sys.exit(main())
