"""Exporting a trained model as the serving SavedModel: ours against tft's Keras layer.

Every Trainer run ends with `fer_pipeline.core.serving_export.export_serving_model`: the Keras model and
the Transform step's graph go into one tf.Module with four signatures. TFX's templates put
the transform graph in with `tft.TFTransformOutput.transform_features_layer()`, a tf_keras
Model; saving one makes tf_keras trace call signatures of its own for it. Ours tracks the
same transform SavedModel through a plain tf.Module (fer_pipeline.core.serving_export.TransformGraph).

This times both ways on the same model (same seed) and transform graph, alternating
(A B A B ...), each export in a fresh process as in a Trainer run (TF caches traced and
autograph-converted code within a process, so a second export in one process is not what a
run pays), and checks they serve the same probabilities. It needs a Transform output; by
default it makes a small one from synthetic faces.

    .venv/bin/python benchmarks/export.py [--model cnn] [--repeats 3] [--transform-dir DIR]
        [--out bench_runs/export/export.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402

from benchmarks.serving import machine_facts  # noqa: E402
from fer_pipeline.core.serving_export import (ServingModule, export_serving_model,  # noqa: E402
                                              save_serving_module)
from fer_pipeline.components.trainer.models import build_model  # noqa: E402
from fer_pipeline.core.config import MODEL_REGISTRY, TrainConfig  # noqa: E402
from fer_pipeline.core.contract import SIGNATURE_UINT8  # noqa: E402


class ServingModuleWithTftLayer(ServingModule):
    """The same signatures, with the transform graph as tft's tf_keras layer."""

    def __init__(self, keras_model, transform_graph_dir: str):
        super().__init__(keras_model, transform_graph_dir)
        self.transform_graph = tft.TFTransformOutput(
            transform_graph_dir).transform_features_layer()


def export_with_tft_layer(keras_model, transform_graph_dir: str, export_dir: str) -> None:
    save_serving_module(ServingModuleWithTftLayer(keras_model, transform_graph_dir),
                        export_dir)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=sorted(MODEL_REGISTRY))
    parser.add_argument("--repeats", type=int, default=3, help="exports per way")
    parser.add_argument("--transform-dir", default="",
                        help="a Transform step output (default: made from synthetic faces)")
    parser.add_argument("--out", default="bench_runs/export/export.json")
    parser.add_argument("--child", choices=sorted(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


WAYS = {"ours": export_serving_model, "tft_layer": export_with_tft_layer}
LABELS = {"ours": "ours (TransformGraph, no autograph)",
          "tft_layer": "tft.transform_features_layer()"}


def export_once(args: argparse.Namespace) -> float:
    """In this (fresh) process: builds the model with a fixed seed and times one export."""
    import keras
    keras.utils.set_random_seed(0)
    model = build_model(args.model, TrainConfig(), jit_compile=False)
    graph_dir = str(Path(args.transform_dir, "transform_graph"))
    started = time.perf_counter()
    WAYS[args.child](model, graph_dir, args.export_dir)
    return time.perf_counter() - started


def served_probabilities(export_dir: str) -> np.ndarray:
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48)).astype(np.uint8)
    serve = tf.saved_model.load(export_dir).signatures[SIGNATURE_UINT8]
    return serve(pixels=tf.constant(faces))["probabilities"].numpy()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps({"seconds": export_once(args)}))
        return 0
    scratch = tempfile.mkdtemp(prefix="export_bench_")
    transform_dir = args.transform_dir
    if not transform_dir:
        from tests.test_export import make_transform_dir
        transform_dir = make_transform_dir(scratch, {"train": 140, "validation": 14,
                                                     "test": 14})
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    outputs: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        for way in WAYS:
            export_dir = str(Path(scratch, f"{way}-{repeat}"))
            child = subprocess.run(
                [sys.executable, __file__, "--child", way, "--model", args.model,
                 "--transform-dir", transform_dir, "--export-dir", export_dir],
                capture_output=True, text=True, check=True)
            seconds[way].append(json.loads(child.stdout.strip().splitlines()[-1])["seconds"])
            outputs[way] = served_probabilities(export_dir)
            print(f"[export] {LABELS[way]}: {seconds[way][-1]:.1f} s", flush=True)
    np.testing.assert_allclose(outputs["ours"], outputs["tft_layer"], atol=1e-6)
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    ratio = medians["tft_layer"] / medians["ours"]
    report = {"model": args.model, "repeats": args.repeats, "machine": machine_facts(),
              "seconds": seconds, "median_s": medians, "ratio": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[export] {args.model}: median {medians['ours']:.1f} s ours vs "
          f"{medians['tft_layer']:.1f} s with tft's layer ({ratio:.1f}x); same "
          f"probabilities; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
