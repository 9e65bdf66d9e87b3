"""Small real SavedModels for the review tests: the serving fixtures' tiny linear model
plus the `explain` signature, computed by the same integrated-gradients code the exported
models use (fer_pipeline.core.serving_export.integrated_gradients)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from fer_pipeline.core.serving_export import integrated_gradients
from fer_pipeline.core.contract import NUM_CLASSES, NUM_PIXELS, OUTPUT_SALIENCY
from tests.serving_fixtures import TinyFerModel

BLACK = np.zeros(NUM_PIXELS, np.float32)


class TinyExplainModel(TinyFerModel):
    """TinyFerModel (softmax of a linear map of pixels/255) with an explain signature."""

    def _probabilities(self, image: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(tf.matmul(image, self.weights) + self.bias)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="pixels")])
    def explain(self, pixels):
        image = tf.reshape(tf.cast(pixels, tf.float32), [-1, NUM_PIXELS]) / 255.0
        outputs = self._outputs(pixels)
        outputs[OUTPUT_SALIENCY] = integrated_gradients(self._probabilities, image,
                                                        tf.constant(BLACK))
        return outputs


def save_explain_model(export_dir: str, seed: int = 0, bias_class: int = 3) -> str:
    """A random tiny model favouring `bias_class`, with all four signatures."""
    weights = np.random.default_rng(seed).normal(0, 0.05, (NUM_PIXELS, NUM_CLASSES))
    bias = np.zeros(NUM_CLASSES)
    bias[bias_class] = 1.0
    module = TinyExplainModel(weights, bias)
    tf.saved_model.save(module, export_dir, signatures={
        "serving_default": module.serve_int32.get_concrete_function(),
        "serving_uint8": module.serve_uint8.get_concrete_function(),
        "serving_examples": module.serve_examples.get_concrete_function(),
        "explain": module.explain.get_concrete_function(),
    })
    return export_dir
