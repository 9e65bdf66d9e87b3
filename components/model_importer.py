"""Model importer: a Keras file trained outside the pipeline becomes a candidate model.

The notebook this pipeline replaces handed its models over as files (`modelo_cnn.h5`,
`modelo_vgg.h5`). `fer-pipeline import-model --keras FILE --name NAME` wraps such a file in
the same SavedModel a trained model is exported as (core/serving_export.py: the contract's
four signatures), and writes the same layout a train step writes (serving_model/,
training_info.json), so evaluate, infra-validate and push take it like any trained model.

What the wrapper does between the raw pixels of a request and the file's model:

- the file's own preprocessing, not the Transform step's normalization: the notebook's
  models were trained on pixels x 1/255 (`scale`), and z-scored pixels would be a different
  input to them. The raw pixels are parsed by the same signatures (the raw feature spec of
  the Transform output), so requests and examples are read exactly as for trained models;
- the face (48x48, one channel) is resized inside the graph to the file's input size when
  that differs, and its channel repeated when the file takes 3 channels (VGG16-style).

Calibration (core/calibration.py): the file's softmax Dense is wired into the wrapper as
its last layer, so the export serves its real logits, and the temperature is fitted on the
Transform step's validation split when it has one. That split holds normalized images, not
raw pixels; every normalization Transform offers is one affine map of the pixel value
(z-score, min-max, /255), so the raw pixels are recovered exactly (rounded) by inverting the
map probed through the transform graph, and scaled as the file expects. No validation split,
or a transform that is not affine: T = 1, recorded in training_info.json as not calibrated.

Refused with one line (InputDataError): a file that does not load as a Keras model, one
whose output is not a softmax over the 7 FER-2013 classes, one whose input is not an image
of 1 or 3 channels, or whose size the file leaves open and --input-shape does not give.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import keras
import numpy as np
import tensorflow as tf

from fer_pipeline.core import fileio
from fer_pipeline.core.config import ImportConfig
from fer_pipeline.core.contract import (CLASS_NAMES, FEATURE_IMAGE, FEATURE_PIXELS, IMAGE_SIZE,
                                        NUM_CLASSES, NUM_PIXELS, SERVING_MODEL_DIR,
                                        TRAINING_INFO_FILE, TRANSFORM_GRAPH_DIR)
from fer_pipeline.core.errors import InputDataError, MissingInputError
from fer_pipeline.core.serving_export import TransformGraph, export_serving_model, softmax_head
from fer_pipeline.core.training_data import make_dataset, split_pattern

__all__ = ["run_model_importer", "ImportResult", "ScaledPixels", "sha256_of"]

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


@dataclass
class ImportResult:
    model_name: str
    serving_model_dir: str
    training_info_path: str
    keras_file: str
    sha256: str                     # of the file's bytes, as `sha256sum` prints it
    file_input_shape: list          # (height, width, channels) the file declares (None: open)
    input_shape: list               # what the wrapper feeds it
    scale: float
    resized: bool
    channels_repeated: bool
    parameters: int
    calibration: Optional[dict[str, Any]] = None   # core/calibration.calibration_record


class ScaledPixels(tf.Module):
    """The notebook's preprocessing, in place of the Transform graph: raw pixel bytes ->
    float32 [batch, 2304] = pixel x scale (ServingModule's `preprocessing` interface)."""

    def __init__(self, scale: float):
        super().__init__(name="scaled_pixels")
        self.scale = tf.constant(scale, tf.float32)

    def __call__(self, raw_features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pixels = tf.io.decode_raw(raw_features[FEATURE_PIXELS], tf.uint8)
        pixels = tf.reshape(pixels, [-1, NUM_PIXELS])
        return {FEATURE_IMAGE: tf.cast(pixels, tf.float32) * self.scale}


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load(path: str, shown: str) -> keras.Model:
    """The Keras model in `path` (legacy HDF5 or Keras 3 zip), uncompiled."""
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a bad file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputDataError(f"{shown}: not a loadable Keras model ({first[:200]})") from None
    if not isinstance(model, keras.Model):
        raise InputDataError(f"{shown}: holds a {type(model).__name__}, not a Keras model")
    return model


def _final_activation(model: keras.Model) -> str:
    """The name of the last layer's activation ('softmax', 'linear', ...)."""
    layer = model.layers[-1]
    if isinstance(layer, keras.Model):
        return _final_activation(layer)
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation)) if activation else "none"


def check_classifier(model: keras.Model, shown: str) -> None:
    """A 7-way softmax over FER-2013's classes, or an InputDataError saying what it is."""
    outputs = model.outputs
    if len(outputs) != 1:
        raise InputDataError(f"{shown}: the model has {len(outputs)} outputs; an importable "
                             f"model has one, a softmax over the {NUM_CLASSES} FER-2013 classes")
    shape = tuple(outputs[0].shape)
    activation = _final_activation(model)
    if shape[1:] != (NUM_CLASSES,) or activation != "softmax":
        raise InputDataError(
            f"{shown}: the model's output is {activation} of shape {list(shape)}, not a "
            f"{NUM_CLASSES}-way softmax over FER-2013's classes ({', '.join(CLASS_NAMES)})")


def input_shape(model: keras.Model, wanted: Optional[tuple[int, int, int]],
                shown: str) -> tuple[list, tuple[int, int, int]]:
    """(the file's (h, w, c), what to feed it); --input-shape only fills what the file
    leaves open and must agree with what it declares."""
    if len(model.inputs) != 1:
        raise InputDataError(f"{shown}: the model has {len(model.inputs)} inputs; an "
                             "importable model takes one image")
    declared = list(model.inputs[0].shape)[1:]
    if len(declared) != 3:
        raise InputDataError(f"{shown}: the model takes input of shape {[None, *declared]}; "
                             "an importable model takes images (height, width, channels)")
    if wanted is not None:
        clash = [(d, w) for d, w in zip(declared, wanted) if d is not None and d != w]
        if clash:
            raise InputDataError(f"{shown}: --input-shape {','.join(map(str, wanted))} "
                                 f"disagrees with the file's input {declared}")
    used = tuple(d if d is not None else (wanted[i] if wanted else None)
                 for i, d in enumerate(declared))
    if any(v is None for v in used):
        raise InputDataError(f"{shown}: the file leaves its input size open ({declared}); "
                             "give it with --input-shape HEIGHT,WIDTH,CHANNELS")
    if used[2] not in (1, 3):
        raise InputDataError(f"{shown}: the model takes {used[2]} channels; importable "
                             "models take 1 (grey) or 3 (the grey face repeated)")
    return declared, used  # type: ignore[return-value]


def adapter(model: keras.Model, shape: tuple[int, int, int]) -> keras.Model:
    """[batch, 2304] scaled pixels -> the file's input (resized, channels repeated) -> it."""
    height, width, channels = shape
    inputs = keras.Input(shape=(NUM_PIXELS,), name="image")
    x = keras.layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), name="to_grid")(inputs)
    if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
        x = keras.layers.Resizing(height, width, interpolation="bilinear", name="resize")(x)
    if channels == 3:
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    head = softmax_head(model)
    if head:
        # The file's layers up to its softmax Dense, then that Dense, called in this graph:
        # the export reads the logits off the Dense (core/serving_export.softmax_head).
        features, dense = head
        outputs = dense(features(x))
    else:
        outputs = model(x)
    return keras.Model(inputs, outputs, name=f"imported_{model.name}")


def validation_batches(transform_dir: str, scale: float
                       ) -> tuple[Optional[Iterator[tuple[np.ndarray, np.ndarray]]], str]:
    """(the validation split as the file's input: (raw pixels x scale, label) batches, "")
    or (None, why not); see the module docstring."""
    pattern = split_pattern(transform_dir, "validation")
    if not fileio.glob(pattern):
        return None, f"no validation split under {transform_dir}: not calibrated"
    import tensorflow_transform as tft

    graph = TransformGraph(tft.TFTransformOutput(
        fileio.join(transform_dir, TRANSFORM_GRAPH_DIR)).transform_savedmodel_dir)
    probes = np.array([0, 85, 170, 255])
    images = graph({FEATURE_PIXELS: tf.constant([bytes([int(v)]) * NUM_PIXELS
                                                 for v in probes])})[FEATURE_IMAGE].numpy()
    low, slope = float(images[0, 0]), float(images[-1, 0] - images[0, 0]) / 255.0
    if slope <= 0 or not np.allclose(images, low + slope * probes[:, None], rtol=0,
                                     atol=1e-3 * slope):
        return None, "the Transform step's normalization is not affine: not calibrated"

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for image, label in make_dataset(pattern, 256, training=False, seed=0):
            raw = np.clip(np.rint((image.numpy() - low) / slope), 0, 255)
            yield (raw * scale).astype(np.float32), label.numpy()
    return batches(), ""


def run_model_importer(keras_file: str, transform_dir: str, output_dir: str,
                       config: ImportConfig, model_name: str) -> ImportResult:
    """Wraps `keras_file` (.h5 or .keras) into output_dir/serving_model (module docstring).

    `transform_dir` is the Transform step's output: its raw feature spec parses requests.
    `output_dir` may be a URI; the file must be readable through core/fileio.
    """
    if not fileio.exists(keras_file):
        raise MissingInputError(f"--keras {keras_file}: no such file")
    if not keras_file.lower().endswith(KERAS_SUFFIXES):
        raise InputDataError(f"--keras {keras_file}: expected a Keras .h5 or .keras file")
    scratch = tempfile.mkdtemp(prefix="fer-import-")
    try:
        local = keras_file
        if fileio.is_uri(keras_file):   # Keras and h5py read local files only
            local = os.path.join(scratch, os.path.basename(keras_file))
            fileio.copy_file(keras_file, local)
        digest = sha256_of(local)
        model = _load(local, keras_file)
        check_classifier(model, keras_file)
        declared, used = input_shape(model, config.input_shape, keras_file)
        wrapped = adapter(model, used)
        export_dir = (fileio.join(output_dir, SERVING_MODEL_DIR) if not fileio.is_uri(output_dir)
                      else os.path.join(scratch, SERVING_MODEL_DIR))
        batches, why_not = validation_batches(transform_dir, config.scale)
        calibration = export_serving_model(
            wrapped, fileio.join(transform_dir, TRANSFORM_GRAPH_DIR), export_dir,
            preprocessing=ScaledPixels(config.scale), calibration_batches=batches)
        if why_not:
            calibration["reason"] = why_not
        if export_dir != fileio.join(output_dir, SERVING_MODEL_DIR):
            fileio.copytree(export_dir, fileio.join(output_dir, SERVING_MODEL_DIR))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = ImportResult(
        model_name=model_name, serving_model_dir=fileio.join(output_dir, SERVING_MODEL_DIR),
        training_info_path=fileio.join(output_dir, TRAINING_INFO_FILE),
        keras_file=keras_file, sha256=digest, file_input_shape=declared,
        input_shape=list(used), scale=config.scale,
        resized=tuple(used[:2]) != (IMAGE_SIZE, IMAGE_SIZE),
        channels_repeated=used[2] == 3, parameters=int(model.count_params()),
        calibration=calibration)
    fileio.write_json(result.training_info_path,
                      {**_training_info(result, model, transform_dir), "calibration": calibration})
    log.info("imported %s as %s (sha256 %s)", keras_file, model_name, digest)
    return result


def _training_info(result: ImportResult, model: keras.Model, transform_dir: str
                   ) -> dict[str, Any]:
    """training_info.json as a train step writes it, with `imported` saying where from."""
    return {
        "model_name": result.model_name,
        "imported": {
            "keras_file": result.keras_file, "sha256": result.sha256,
            "file_input_shape": result.file_input_shape, "input_shape": result.input_shape,
            "scale": result.scale, "resized": result.resized,
            "channels_repeated": result.channels_repeated,
            "parameters": result.parameters, "architecture": model.name,
            "layers": [layer.__class__.__name__ for layer in model.layers],
        },
        "vgg_weights": None,
        "transform_dir": transform_dir,
        "keras_backend": keras.backend.backend(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": sys.version.split()[0]},
    }
