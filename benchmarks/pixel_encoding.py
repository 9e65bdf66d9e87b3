"""Raw bytes vs int64 list for the `pixels` feature: TFRecord size and parse+decode speed.

ExampleGen stores each 48x48 image as one 2304-byte string; the notebook's CSV thinking would
suggest an int64 list of 2304 values. This measures both on synthetic faces and prints a
markdown table. Run: `.venv/bin/python benchmarks/pixel_encoding.py [--images N]`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from fer_pipeline.pipeline.synthetic import draw_faces
from fer_pipeline.core.contract import FEATURE_PIXELS, IMAGE_SIZE, NUM_CLASSES, NUM_PIXELS

BATCH = 256
REPEATS = 3


def raw_bytes_example(image: np.ndarray) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={FEATURE_PIXELS: tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[image.tobytes()]))})).SerializeToString()


def int64_list_example(image: np.ndarray) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={FEATURE_PIXELS: tf.train.Feature(
        int64_list=tf.train.Int64List(value=image.reshape(-1).tolist()))})).SerializeToString()


def decode_raw_bytes(serialized: tf.Tensor) -> tf.Tensor:
    parsed = tf.io.parse_example(serialized, {FEATURE_PIXELS: tf.io.FixedLenFeature([], tf.string)})
    pixels = tf.io.decode_raw(parsed[FEATURE_PIXELS], tf.uint8)
    return tf.reshape(pixels, [-1, IMAGE_SIZE, IMAGE_SIZE])


def decode_int64_list(serialized: tf.Tensor) -> tf.Tensor:
    parsed = tf.io.parse_example(
        serialized, {FEATURE_PIXELS: tf.io.FixedLenFeature([NUM_PIXELS], tf.int64)})
    return tf.reshape(tf.cast(parsed[FEATURE_PIXELS], tf.uint8), [-1, IMAGE_SIZE, IMAGE_SIZE])


def write_tfrecord(path: str, records: list[bytes]) -> int:
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return os.path.getsize(path)


def examples_per_second(path: str, decode, expected: np.ndarray) -> float:
    """Best of REPEATS full passes of TFRecord read + parse_example + decode, batched."""
    dataset = tf.data.TFRecordDataset(path).batch(BATCH).map(decode)
    decoded = np.concatenate([batch.numpy() for batch in dataset])
    assert np.array_equal(decoded, expected), "decoding does not round-trip"
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _batch in dataset:
            pass
        best = min(best, time.perf_counter() - started)
    return len(expected) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = draw_faces(rng.integers(0, NUM_CLASSES, args.images), rng)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, encode, decode in (("raw bytes (ours)", raw_bytes_example, decode_raw_bytes),
                                     ("int64 list", int64_list_example, decode_int64_list)):
            path = os.path.join(tmp, name.split()[0] + ".tfrecord")
            size = write_tfrecord(path, [encode(image) for image in images])
            rate = examples_per_second(path, decode, images)
            rows.append((name, size / len(images), rate))
    print(f"{args.images} synthetic 48x48 images, batch {BATCH}, best of {REPEATS}\n")
    print("| pixels encoding | bytes/example in TFRecord | read+parse+decode examples/s |")
    print("|---|---|---|")
    for name, per_example, rate in rows:
        print(f"| {name} | {per_example:,.0f} | {rate:,.0f} |")
    ratio_size = rows[1][1] / rows[0][1]
    ratio_speed = rows[0][2] / rows[1][2]
    print(f"\nint64 list is {ratio_size:.2f}x larger; raw bytes decode {ratio_speed:.1f}x faster.")


if __name__ == "__main__":
    main()
