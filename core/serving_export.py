"""Export: one SavedModel = the Transform graph + a Keras 3 model, for TF Serving.

Shared by the trainer (components/trainer/) and the model importer
(components/model_importer.py, whose Keras file brings its own preprocessing instead of
the Transform graph: `ServingModule(preprocessing=...)`).

The TFT layer is a tf_keras object and cannot live inside a Keras 3 functional model, so
both go into a plain `tf.Module` whose `tf.function` signatures take raw pixels, run the
transform graph (the same normalization the training data had) and then the Keras model.
`tf.saved_model.save` copies the transform graph's assets into the export, so the served
model does not need the transform directory any more.

Signatures (docs/architecture.md, "Export signature"):
  serving_default   pixels int32  [batch, 48, 48] or [batch, 2304]
  serving_uint8     pixels uint8  (same shapes; 4x smaller gRPC payloads)
  serving_examples  examples string [batch] of serialized raw tf.Examples (`pixels` only)
  explain           pixels uint8 (same shapes): the same outputs plus saliency
each returning probabilities float32 [batch, 7], class_id int64 [batch] and
class_name string [batch]; `explain` adds saliency float32 [batch, 7, 48, 48]. A FER+
model with `contempt` has 8 outputs: [batch, 8] and [batch, 8, 48, 48], class names from
core/contract.class_names_for(8).

Saliency is integrated gradients (Sundararajan et al. 2017) of each class probability with
respect to the normalized image the model sees, from an all-black face to the input, with
INTEGRATION_STEPS midpoint steps; a map keeps the positive part (the pixels that pushed the
model towards that class) and is divided by its own maximum, so every map spans [0, 1]
(all zeros when nothing pushed towards the class). Grad-CAM was not used: the last
convolutional maps are 2x2 (CNN) and 3x3 (VGG16) for a 48x48 face, too coarse to show
which part of the face mattered.

Calibration: every signature also returns `logits` float32 [batch, classes], the values
before the softmax, and its probabilities are softmax(logits / T) with the module's
`temperature` T fitted on the validation split (core/calibration.py; T = 1 when nothing
was fitted). Dividing by T keeps the top class, so class_id and class_name are those of the
uncalibrated model too. A model whose last layer is not a softmax Dense serves log p as its
logits: equal to them up to a constant per face, which the softmax ignores.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import keras
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform.saved import saved_transform_io_v2

from fer_pipeline.core.calibration import calibration_record

from fer_pipeline.core.contract import (FEATURE_IMAGE, FEATURE_PIXELS, IMAGE_SIZE,
    NUM_CLASSES, NUM_PIXELS, SIGNATURE_DEFAULT, SIGNATURE_UINT8, SIGNATURE_EXAMPLES,
    SIGNATURE_EXPLAIN, INPUT_EXAMPLES, OUTPUT_PROBABILITIES, OUTPUT_CLASS_ID,
    OUTPUT_CLASS_NAME, OUTPUT_LOGITS, OUTPUT_SALIENCY, class_names_for)

__all__ = ["INTEGRATION_STEPS", "PIXEL_MAX", "ServingModule", "TransformGraph",
           "export_serving_model", "fit_module_temperature", "integrated_gradients",
           "save_serving_module", "softmax_head"]

PIXEL_MAX = 255
RAW_PIXELS_SPEC = tf.io.FixedLenFeature([], tf.string)
# Points on the path from the black face to the input. The 7 backward passes per point
# dominate the cost (measured through fer-serve on 2 busy CPU cores: VGG16 3.9 s per face,
# the CNN 0.2 s).
INTEGRATION_STEPS = 16


def integrated_gradients(probabilities_fn: Callable[[tf.Tensor], tf.Tensor],
                         images: tf.Tensor, baseline: tf.Tensor,
                         steps: int = INTEGRATION_STEPS,
                         num_classes: int = NUM_CLASSES) -> tf.Tensor:
    """Per-class saliency float32 [batch, 7, 48, 48], each map in [0, 1] (module docstring);
    [batch, 8, 48, 48] for a FER+ model (`num_classes`: the width of its probabilities).

    `probabilities_fn` maps normalized images [n, 2304] to probabilities [n, 7];
    `images` is [batch, 2304] and `baseline` [2304], both normalized. Faces are explained
    one at a time (tf.map_fn, no parallel iterations) so a large request costs time, not
    `batch x steps` images' worth of activations in memory at once.
    """
    alphas = (tf.range(steps, dtype=tf.float32) + 0.5) / steps

    def explain_one(image: tf.Tensor) -> tf.Tensor:
        delta = image - baseline                                        # [2304]
        path = baseline[None, :] + alphas[:, None] * delta[None, :]     # [steps, 2304]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(path)
            probabilities = probabilities_fn(path)                      # [steps, 7]
            per_class = [probabilities[:, k] for k in range(num_classes)]
        # Rows are independent (inference mode), so the gradient of a column's sum is
        # each row's own gradient.
        gradients = tf.stack([tape.gradient(column, path) for column in per_class])
        del tape
        attributions = tf.nn.relu(delta[None, :] * tf.reduce_mean(gradients, axis=1))
        peak = tf.reduce_max(attributions, axis=1, keepdims=True)
        maps = tf.math.divide_no_nan(attributions, peak)                # [7, 2304]
        return tf.reshape(maps, [num_classes, IMAGE_SIZE, IMAGE_SIZE])

    return tf.map_fn(explain_one, tf.cast(images, tf.float32), parallel_iterations=1,
                     fn_output_signature=tf.TensorSpec([num_classes, IMAGE_SIZE, IMAGE_SIZE],
                                                       tf.float32))


class TransformGraph(tf.Module):
    """The Transform step's graph, applied inside our signatures and saved with them.

    This is what tft's `transform_features_layer()` does (a loader of the transform
    SavedModel whose attributes are tracked, so its functions, constants and assets are
    saved) without being a tf_keras Model: saving a tf_keras Model makes tf_keras trace
    signatures of its own for it with autograph, which took most of every export's time
    (docs/benchmarks.md, "Export") and which nothing ever calls.
    """

    def __init__(self, transform_savedmodel_dir: str):
        super().__init__(name="transform_graph")
        self._loader = saved_transform_io_v2.SavedModelLoader(transform_savedmodel_dir)
        self.loaded = self._loader.__dict__

    def __call__(self, raw_features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return self._loader.apply_transform_model(raw_features)


class ServingModule(tf.Module):
    """Raw pixels -> transform graph -> Keras 3 model -> probabilities and class.

    The signatures are traced without autograph: they hold no Python control flow on
    tensors (tf.map_fn is explicit), and autograph's source rewriting of every function
    they call cost a third of each export.
    """

    def __init__(self, keras_model: keras.Model, transform_graph_dir: str,
                 preprocessing: Optional[tf.Module] = None, temperature: float = 1.0):
        super().__init__(name="fer_serving")
        self.keras_model = keras_model
        # Temperature scaling (core/calibration.py): the served probabilities are
        # softmax(logits / T). A variable, so the trainer fits T on this very module's logits
        # and assigns it before saving; the SavedModel keeps it as `temperature`.
        self.temperature = tf.Variable(float(temperature), trainable=False, dtype=tf.float32,
                                       name="temperature")
        # The logits: the input of the model's final softmax Dense times its kernel, plus
        # its bias; None when the model ends otherwise (then log p, see logits()).
        head = softmax_head(keras_model)
        self.features_model, self._head = head if head else (None, None)
        # Keras 3 variables wrap tf.Variables; list the underlying ones explicitly so the
        # SavedModel tracks every weight whatever Keras' own tracking does.
        self.model_variables = [_tf_variable(v) for v in keras_model.variables]
        tft_output = tft.TFTransformOutput(transform_graph_dir)
        # What turns raw pixels into the model's input: the Transform step's graph for the
        # models trained here; an imported model brings its own (components/model_importer.py:
        # it was trained on its notebook's scaling, not on our normalization). Either maps
        # {pixels: raw bytes [b]} to {image: float [b, 2304]}.
        self.transform_graph = preprocessing or TransformGraph(
            tft_output.transform_savedmodel_dir)
        # Only `pixels` is parsed: serving requests carry no label.
        self._pixels_spec = _raw_pixels_spec(tft_output)
        # The model's own classes, read off its output width: FER-2013's 7 or FER+'s 8.
        self.num_classes = int(keras_model.output_shape[-1])
        self.class_names = tf.constant(list(class_names_for(self.num_classes)))
        # Byte i -> the 1-byte string chr(i): turns integer pixels into the raw bytes
        # feature the transform graph was built on, without leaving the graph.
        self._byte_strings = tf.constant([bytes([i]) for i in range(PIXEL_MAX + 1)])

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32, name=FEATURE_PIXELS)],
                 autograph=False)
    def serve_int32(self, pixels):
        checks = [
            tf.debugging.assert_greater_equal(pixels, 0, message="pixels must be >= 0"),
            tf.debugging.assert_less_equal(pixels, PIXEL_MAX,
                                           message=f"pixels must be <= {PIXEL_MAX}"),
        ]
        with tf.control_dependencies(checks):
            return self._predict_pixels(tf.cast(pixels, tf.uint8))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name=FEATURE_PIXELS)],
                 autograph=False)
    def serve_uint8(self, pixels):
        return self._predict_pixels(pixels)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name=FEATURE_PIXELS)],
                 autograph=False)
    def explain(self, pixels):
        image = self._normalize(self._raw_rows(pixels))
        outputs = self._answers(image)
        black = self._normalize(self._raw_rows(tf.zeros([1, NUM_PIXELS], tf.uint8)))[0]
        outputs[OUTPUT_SALIENCY] = integrated_gradients(self._probabilities, image, black,
                                                        num_classes=self.num_classes)
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_EXAMPLES)],
                 autograph=False)
    def serve_examples(self, examples):
        features = tf.io.parse_example(examples, {FEATURE_PIXELS: self._pixels_spec})
        return self._predict_raw(features[FEATURE_PIXELS])

    def _predict_pixels(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._predict_raw(self._raw_rows(pixels))

    def _raw_rows(self, pixels: tf.Tensor) -> tf.Tensor:
        # [b, 48, 48] and [b, 2304] both become [b] strings of 2304 bytes; anything else
        # whose size is not a multiple of 2304 fails here with a clear message.
        tf.debugging.assert_equal(tf.size(pixels) % NUM_PIXELS, 0,
                                  message=f"pixels must hold a multiple of {NUM_PIXELS} values")
        rows = tf.reshape(pixels, [-1, NUM_PIXELS])
        return tf.strings.reduce_join(tf.gather(self._byte_strings, tf.cast(rows, tf.int32)),
                                      axis=-1)

    def _predict_raw(self, raw_pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._answers(self._normalize(raw_pixels))

    def _normalize(self, raw_pixels: tf.Tensor) -> tf.Tensor:
        """Raw pixel strings -> the image feature the model was trained on (float [b, 2304])."""
        raw_pixels = tf.reshape(raw_pixels, [-1] + list(self._pixels_spec.shape))
        return tf.cast(self.transform_graph({FEATURE_PIXELS: raw_pixels})[FEATURE_IMAGE],
                       tf.float32)

    def logits(self, image: tf.Tensor) -> tf.Tensor:
        """The model's pre-softmax values float32 [b, classes] for normalized images."""
        if self._head is None:
            # A model whose last layer is not a softmax Dense: log p. It equals the logits up
            # to a constant per face, which softmax(. / T) ignores for every T.
            probabilities = tf.cast(self.keras_model(image, training=False), tf.float32)
            return tf.math.log(tf.maximum(probabilities, 1e-12))
        features = tf.cast(self.features_model(image, training=False), tf.float32)
        logits = tf.matmul(features, tf.cast(_tf_variable(self._head.kernel), tf.float32))
        if self._head.use_bias:
            logits += tf.cast(_tf_variable(self._head.bias), tf.float32)
        return logits

    def _probabilities(self, image: tf.Tensor) -> tf.Tensor:
        """The calibrated probabilities softmax(logits / T) (what saliency explains too)."""
        return tf.nn.softmax(self.logits(image) / self.temperature)

    def _answers(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.logits(image)
        outputs = self._outputs(tf.nn.softmax(logits / self.temperature))
        outputs[OUTPUT_LOGITS] = logits
        return outputs

    def _outputs(self, probabilities: tf.Tensor) -> dict[str, tf.Tensor]:
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {
            OUTPUT_PROBABILITIES: probabilities,
            OUTPUT_CLASS_ID: class_id,
            OUTPUT_CLASS_NAME: tf.gather(self.class_names, class_id),
        }


def export_serving_model(keras_model: keras.Model, transform_graph_dir: str,
                         export_dir: str, preprocessing: Optional[tf.Module] = None,
                         calibration_batches: Optional[Iterable[tuple[Any, Any]]] = None
                         ) -> dict[str, Any]:
    """Writes the SavedModel with the serving and explain signatures to `export_dir`
    (`preprocessing`: see ServingModule; default the Transform step's graph).

    `calibration_batches`: (normalized image [b, 2304], label [b]) batches of the
    validation split; the temperature is fitted on them (fit_module_temperature) before
    saving. Returns the calibration record (T = 1, "not calibrated", without them).
    """
    module = ServingModule(keras_model, transform_graph_dir, preprocessing)
    record = fit_module_temperature(module, calibration_batches)
    save_serving_module(module, export_dir)
    return record


def fit_module_temperature(module: ServingModule,
                           batches: Optional[Iterable[tuple[Any, Any]]]) -> dict[str, Any]:
    """Fits `module`'s temperature on (normalized image, label) batches and assigns it;
    the record training_info.json keeps (core/calibration.calibration_record)."""
    logits, labels = [], []
    for images, batch_labels in batches or ():
        logits.append(module.logits(tf.convert_to_tensor(images, tf.float32)).numpy())
        batch_labels = np.asarray(batch_labels)
        # Soft targets (a vote distribution per face): calibrate against their top class.
        labels.append(batch_labels.argmax(axis=-1) if batch_labels.ndim == 2 else batch_labels)
    kind = "logits" if module.features_model is not None else "log_probabilities"
    record = calibration_record(np.concatenate(logits) if logits else None,
                                np.concatenate(labels) if labels else np.zeros(0, np.int64),
                                logits_kind=kind)
    module.temperature.assign(record["temperature"])
    return record


def softmax_head(keras_model: keras.Model) -> Optional[tuple[keras.Model, keras.layers.Dense]]:
    """(a model from the inputs to what the final layer receives, that layer) when the
    model's output is a Dense with softmax activation; None otherwise.

    Read from the output tensor's own history, not `layers[-1].input`: a head called in
    more than one graph (an imported file's model wrapped by an adapter) has one input per
    call, and the output names the call that made it.
    """
    try:
        layer, node_index, _ = keras_model.outputs[0]._keras_history
        if not (isinstance(layer, keras.layers.Dense)
                and getattr(layer.activation, "__name__", "") == "softmax"):
            return None
        features = layer._inbound_nodes[node_index].input_tensors[0]
        # One input is passed bare, as the model itself is called (a list would make Keras
        # warn about the structure on every trace).
        inputs = keras_model.inputs[0] if len(keras_model.inputs) == 1 else keras_model.inputs
        return keras.Model(inputs, features, name="features"), layer
    except (AttributeError, IndexError, TypeError, ValueError):
        return None  # not a functional model: log p stands in for the logits


def save_serving_module(module: ServingModule, export_dir: str) -> None:
    """Saves `module` with its four signatures under the contract's names."""
    signatures = {
        SIGNATURE_DEFAULT: module.serve_int32.get_concrete_function(),
        SIGNATURE_UINT8: module.serve_uint8.get_concrete_function(),
        SIGNATURE_EXAMPLES: module.serve_examples.get_concrete_function(),
        SIGNATURE_EXPLAIN: module.explain.get_concrete_function(),
    }
    tf.saved_model.save(module, export_dir, signatures=signatures)


def _raw_pixels_spec(tft_output: tft.TFTransformOutput) -> tf.io.FixedLenFeature:
    # WriteTransformFn stores the raw schema only when the pipeline wrote raw metadata;
    # otherwise fall back to the artifact contract: one bytes value of 2304 raw pixels.
    try:
        return tft_output.raw_feature_spec()[FEATURE_PIXELS]
    except (OSError, KeyError):
        return RAW_PIXELS_SPEC


def _tf_variable(variable) -> tf.Variable:
    # keras.Variable (TF backend) keeps its tf.Variable in `.value`.
    value = getattr(variable, "value", variable)
    return value if isinstance(value, tf.Variable) else variable
