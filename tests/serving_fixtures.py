"""Small real SavedModels with the exact export signatures of the trainer's models.

The serving tests must not depend on training, so this builds a tf.Module whose three
signatures (serving_default, serving_uint8, serving_examples) have the contract's names,
dtypes and shapes: softmax of a fixed linear map of pixels/255. `bias_class` lets each
version favour a different class, so tests can tell which version answered.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import tensorflow as tf

from fer_pipeline.core.contract import CLASS_NAMES, FEATURE_PIXELS, NUM_CLASSES, NUM_PIXELS
from fer_pipeline.core.net import free_port


class TinyFerModel(tf.Module):
    """softmax(pixels/255 @ weights + bias) behind the export contract's three signatures."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weights = tf.constant(weights, tf.float32)
        self.bias = tf.constant(bias, tf.float32)
        self.names = tf.constant(list(CLASS_NAMES))

    def _features(self, flat: tf.Tensor) -> tf.Tensor:
        """What the weights multiply: [batch, 2304] float pixels scaled to [0, 1]."""
        return flat / 255.0

    def _outputs(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        flat = tf.reshape(tf.cast(pixels, tf.float32), [-1, NUM_PIXELS])
        probabilities = tf.nn.softmax(tf.matmul(self._features(flat), self.weights) + self.bias)
        class_id = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        return {"probabilities": probabilities, "class_id": class_id,
                "class_name": tf.gather(self.names, class_id)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32, name="pixels")])
    def serve_int32(self, pixels):
        return self._outputs(pixels)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="pixels")])
    def serve_uint8(self, pixels):
        return self._outputs(pixels)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        parsed = tf.io.parse_example(
            examples, {FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string)})
        pixels = tf.io.decode_raw(parsed[FEATURE_PIXELS], tf.uint8)
        return self._outputs(pixels)


def save_contract_model(export_dir: str, weights: np.ndarray,
                        bias: np.ndarray | None = None) -> str:
    """Writes a real SavedModel with the contract's three signatures to `export_dir`."""
    module = TinyFerModel(weights, np.zeros(NUM_CLASSES) if bias is None else bias)
    tf.saved_model.save(module, export_dir, signatures={
        "serving_default": module.serve_int32.get_concrete_function(),
        "serving_uint8": module.serve_uint8.get_concrete_function(),
        "serving_examples": module.serve_examples.get_concrete_function(),
    })
    return export_dir


def save_tiny_model(export_dir: str, seed: int = 0, bias_class: int = 3) -> str:
    """A small random model that favours `bias_class` on most inputs."""
    weights = np.random.default_rng(seed).normal(0, 0.05, (NUM_PIXELS, NUM_CLASSES))
    bias = np.zeros(NUM_CLASSES)
    bias[bias_class] = 3.0  # strong enough that this class wins on most inputs
    return save_contract_model(export_dir, weights, bias)


def push_version(base_path: str, version: int, template: str) -> str:
    """Copies a SavedModel to `<base_path>/<version>` the way the pusher does: atomically.

    The copy goes to a hidden sibling first, then one rename makes it visible, so a polling
    server never sees a half-written version.
    """
    os.makedirs(base_path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}.partial.", dir=base_path)
    shutil.copytree(template, staging, dirs_exist_ok=True)
    final = os.path.join(base_path, str(version))
    os.rename(staging, final)
    return final


def example_bytes(image: np.ndarray) -> bytes:
    """A serialized raw tf.Example holding one 48x48 uint8 image under `pixels`."""
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[np.asarray(image, np.uint8).tobytes()]))
    return tf.train.Example(features=tf.train.Features(
        feature={FEATURE_PIXELS: feature})).SerializeToString()


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 48, 48), dtype=np.uint8)


def start_server_process(config_path: str, grpc_port: int, rest_port: int, models: list[str],
                         *extra_args: str, timeout_s: float = 120.0) -> subprocess.Popen:
    """Runs `fer-serve` in a subprocess and returns once every model answers over REST.

    Readiness is asked over the protocol rather than read from our own log line, so the
    same helper works when `fer-serve` execs the real tensorflow_model_server.
    """
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "fer-serve"), "--model-config",
         config_path, "--port", str(grpc_port), "--rest-port", str(rest_port), *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    pending = list(models)
    while pending and time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"fer-serve exited with {server.returncode}: "
                                 f"{server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{rest_port}/v1/models/{pending[0]}", timeout=2) as reply:
                states = [s["state"] for s in json.load(reply)["model_version_status"]]
            if "AVAILABLE" in states:
                pending.pop(0)
                continue
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    if pending:
        server.kill()
        raise AssertionError(f"fer-serve did not serve {pending} within {timeout_s:.0f} s")
    return server


def serve_in_subprocess(config: str, log, *extra: str) -> tuple[subprocess.Popen, int, int]:
    """fer-serve as its own process on free ports, so server and clients use both cores;
    its stderr (TF's chatter) goes to the open file `log`. Returns once it says it serves."""
    grpc_port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fer_pipeline.serving.server", "--model-config", config,
         "--port", str(grpc_port), "--rest-port", str(rest_port), "--log-level", "WARNING",
         *extra],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    line = process.stdout.readline()  # printed once the models are loaded and ports bound
    if "gRPC on" not in line:
        process.kill()
        log.seek(0)
        raise AssertionError(f"fer-serve did not start: {line}\n{log.read()[-3000:]}")
    return process, grpc_port, rest_port
