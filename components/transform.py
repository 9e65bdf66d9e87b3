"""Transform: normalize pixels with full-pass training statistics (tensorflow-transform).

One Beam pipeline, shaped like tensorflow-transform's census_example_v2:

  augmented/train        --AnalyzeAndTransformDataset-->  transformed/train
  examples/validation    --TransformDataset------------>  transformed/validation
  examples/test          --TransformDataset------------>  transformed/test
                                                          transform_graph/ (WriteTransformFn)

The statistics (mean and variance of every training pixel) are computed once over the
whole (augmented) training split; validation and test are transformed with those same
training statistics, never their own, exactly as the served model will be. The transform
graph is what the trainer embeds in the SavedModel, so serving normalizes the same way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.coders.example_coder import RecordBatchToExamples
from tfx_bsl.public import tfxio

from fer_pipeline.core import fileio
from fer_pipeline.core.beam_job import beam_pipeline
from fer_pipeline.core.config import TransformConfig
from fer_pipeline.core.contract import (EXAMPLES_PATTERN, FEATURE_IMAGE, FEATURE_LABEL, FEATURE_PIXELS,
    NUM_PIXELS, SHARD_PREFIX, SHARD_SUFFIX, SPLITS, TRANSFORM_GRAPH_DIR, TRANSFORMED_DIR,
    FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_TARGET, FEATURE_FERPLUS_VOTES, FERPLUS_FILE,
    FERPLUS_VOTE_ORDER)
from fer_pipeline.core.errors import ConfigError, MissingInputError

__all__ = ["run_transform", "TransformResult"]

NORMALIZATIONS = ("zscore", "minmax", "scale255")

# Transform reads only the two raw features that matter; the others (usage, row_number,
# source_row, augmentation) are lineage for humans and are not decoded.
RAW_FEATURE_SPEC = {
    FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string),
    FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}
# With FER+ votes (ingest's ferplus.json) transform also reads the votes and the majority:
# the transformed `emotion` is then FER+'s majority, and `ferplus_target` the vote
# distribution over the classes kept, what the trainer's FER+ modes train on.
FERPLUS_FEATURE_SPEC = {
    FEATURE_FERPLUS_VOTES: tf.io.FixedLenFeature([len(FERPLUS_VOTE_ORDER)], tf.int64),
    FEATURE_FERPLUS_MAJORITY: tf.io.FixedLenFeature([], tf.int64),
}


@dataclass
class TransformResult:
    normalization: str
    # image = (pixels - offset) / scale, read back from the transform graph. For "zscore"
    # offset is the training pixel mean and scale its standard deviation; for "minmax"
    # they are the training min and (max - min); for "scale255" they are 0 and 255.
    offset: float
    scale: float
    counts: dict[str, int] = field(default_factory=dict)   # examples written per split
    transform_graph_dir: str = ""
    transformed_dirs: dict[str, str] = field(default_factory=dict)
    # FER+ (ingest's ferplus.json, copied to the output): mode and classes training uses.
    ferplus: dict = field(default_factory=dict)


def preprocessing_fn(inputs: dict[str, tf.Tensor], normalization: str = "zscore",
                     ferplus_classes: int = 0) -> dict[str, tf.Tensor]:
    """Raw {pixels, emotion} -> {image: float32 [batch, 2304], emotion}.

    With `ferplus_classes` (7 or 8) the label is FER+'s majority and `ferplus_target`
    float32 [batch, classes] the share of the emotion votes each class got.
    At serving time the batch holds `pixels` only; TFT prunes the label outputs then,
    because nothing asks for them (tests/test_transform.py checks this).
    """
    pixels = tf.io.decode_raw(inputs[FEATURE_PIXELS], tf.uint8)
    image = tf.cast(tf.reshape(pixels, [-1, NUM_PIXELS]), tf.float32)
    if not ferplus_classes:
        return {
            FEATURE_IMAGE: _normalize(image, normalization),
            FEATURE_LABEL: inputs[FEATURE_LABEL],
        }
    kept = tf.cast(inputs[FEATURE_FERPLUS_VOTES][:, :ferplus_classes], tf.float32)
    # Ingest quarantined every face with no vote for a kept class, so the sum is > 0.
    return {
        FEATURE_IMAGE: _normalize(image, normalization),
        FEATURE_LABEL: inputs[FEATURE_FERPLUS_MAJORITY],
        FEATURE_FERPLUS_TARGET: kept / tf.reduce_sum(kept, axis=1, keepdims=True),
    }


def _normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
    # One scalar per statistic over all pixels of all training images (reduce_instance_dims
    # is TFT's default): per-pixel statistics would let the border pixels of this dataset's
    # faces dominate, and the contract promises one mean and one std.
    if normalization == "zscore":
        # Mean and variance are accumulated in float64: each runner adds the partial sums
        # of its workers in its own order, and in float32 (one ulp of a mean near 112 is
        # 7.6e-6) Flink, Spark and the DirectRunner disagreed in the last bits; in float64
        # they agree far below what the float32 image can show.
        wide = tf.cast(image, tf.float64)
        return tf.cast((wide - tft.mean(wide)) / _nonzero(tf.sqrt(tft.var(wide))), tf.float32)
    if normalization == "minmax":
        low = tft.min(image)
        return (image - low) / _nonzero(tft.max(image) - low)
    if normalization == "scale255":  # the seed notebook's: no statistics at all
        return image / 255.0
    raise ConfigError(f"unknown normalization {normalization!r}; choose from {NORMALIZATIONS}")


def _nonzero(scale: tf.Tensor) -> tf.Tensor:
    # A training split of one flat colour would give scale 0; divide by 1 then, not NaN.
    return tf.where(scale > 0, scale, tf.ones_like(scale))


def run_transform(augmented_dir: str, examples_dir: str, output_dir: str,
                  config: TransformConfig, beam_args: list[str]) -> TransformResult:
    """Analyzes augmented_dir/train, transforms all splits, writes the transform graph."""
    if config.normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {config.normalization!r}; "
                          f"choose from {NORMALIZATIONS}")
    inputs = {"train": fileio.join(augmented_dir, "train", EXAMPLES_PATTERN)}
    for split in SPLITS[1:]:
        inputs[split] = fileio.join(examples_dir, split, EXAMPLES_PATTERN)
    for split, pattern in inputs.items():
        if not fileio.glob(pattern):
            raise MissingInputError(f"no {split} examples match {pattern}")

    # TFT writes the transform graph (a SavedModel) and its temp files with tf.io.gfile
    # inside the pipeline, so TensorFlow must be able to open an s3:// output first.
    fileio.register_filesystem(output_dir)
    graph_dir = fileio.join(output_dir, TRANSFORM_GRAPH_DIR)
    out_dirs = {split: fileio.join(output_dir, TRANSFORMED_DIR, split) for split in inputs}
    temp_dir = fileio.join(output_dir, ".tft_tmp")
    ferplus_path = fileio.join(examples_dir, FERPLUS_FILE)
    ferplus = fileio.read_json(ferplus_path) if fileio.exists(ferplus_path) else {}
    spec = {**RAW_FEATURE_SPEC, **(FERPLUS_FEATURE_SPEC if ferplus else {})}
    schema = schema_utils.schema_from_feature_spec(spec)
    fn = functools.partial(preprocessing_fn, normalization=config.normalization,
                           ferplus_classes=int(ferplus.get("classes", 0)))

    with beam_pipeline(beam_args, "transform") as pipeline:
        with tft_beam.Context(temp_dir=temp_dir):
            train_tfxio = tfxio.TFExampleRecord(inputs["train"], schema=schema)
            raw_train = (pipeline | "ReadTrain" >> train_tfxio.BeamSource(),
                         train_tfxio.TensorAdapterConfig())
            (train_data, _), transform_fn = (
                raw_train
                | "AnalyzeAndTransformTrain" >> tft_beam.AnalyzeAndTransformDataset(
                    fn, output_record_batches=True))
            _ = train_data | "WriteTrain" >> _WriteTransformed(out_dirs["train"])

            for split in SPLITS[1:]:
                split_tfxio = tfxio.TFExampleRecord(inputs[split], schema=schema)
                raw = (pipeline | f"Read{split}" >> split_tfxio.BeamSource(),
                       split_tfxio.TensorAdapterConfig())
                transformed, _ = (
                    (raw, transform_fn)
                    | f"Transform{split}" >> tft_beam.TransformDataset(
                        output_record_batches=True))
                _ = transformed | f"Write{split}" >> _WriteTransformed(out_dirs[split])

            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(graph_dir)

    fileio.rmtree(temp_dir)
    offset, scale = read_normalization(graph_dir)
    if ferplus:
        # The trainer reads the mode and class count here, from its own input.
        fileio.write_json(fileio.join(output_dir, FERPLUS_FILE), ferplus)
    return TransformResult(
        normalization=config.normalization, offset=offset, scale=scale,
        counts={split: count_examples(d) for split, d in out_dirs.items()},
        transform_graph_dir=graph_dir, transformed_dirs=out_dirs, ferplus=ferplus)


class _WriteTransformed(beam.PTransform):
    """(RecordBatch, unary passthrough) pairs -> <directory>/examples-*.tfrecord."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, record_batches):
        return (record_batches
                | "Encode" >> beam.FlatMap(_encode_record_batch)
                | "Write" >> beam.io.WriteToTFRecord(
                    fileio.join(self._directory, SHARD_PREFIX), file_name_suffix=SHARD_SUFFIX))


def _encode_record_batch(batch_and_passthrough) -> list[bytes]:
    record_batch, _ = batch_and_passthrough
    return RecordBatchToExamples(record_batch)


def read_normalization(graph_dir: str) -> tuple[float, float]:
    """(offset, scale) with image = (pixels - offset) / scale, read from the saved graph.

    The graph is affine in the pixel value, so two constant images (all 0 and all 1)
    determine it: image(0) = -offset/scale and image(1) - image(0) = 1/scale.
    """
    images = apply_to_pixels(graph_dir, np.stack([np.zeros(NUM_PIXELS, np.uint8),
                                                  np.ones(NUM_PIXELS, np.uint8)]))
    at_zero, at_one = float(images[0, 0]), float(images[1, 0])
    scale = 1.0 / (at_one - at_zero)
    return -at_zero * scale, scale


def apply_to_pixels(graph_dir: str, pixels: np.ndarray) -> np.ndarray:
    """Runs the transform graph the way serving does: a batch with `pixels` only.

    `pixels` is uint8 [batch, 2304] or [batch, 48, 48]; returns float32 [batch, 2304].
    """
    pixels = np.asarray(pixels, np.uint8).reshape(len(pixels), NUM_PIXELS)
    raw = tf.constant([row.tobytes() for row in pixels])
    fileio.register_filesystem(graph_dir)
    layer = tft.TFTransformOutput(graph_dir).transform_features_layer()
    return layer({FEATURE_PIXELS: raw})[FEATURE_IMAGE].numpy()


def count_examples(directory: str) -> int:
    files = fileio.glob(fileio.join(directory, EXAMPLES_PATTERN))
    if not files:
        return 0
    return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))
