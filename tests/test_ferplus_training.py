"""What training and evaluation make of FER+ votes: the transformed label and soft target,
the probabilistic label drawing, the 8-output head with cross-entropy on soft targets, the
augmentation counting FER+'s majority, and the evaluation's numbers against the votes."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fer_pipeline.components.augment import _key_by_class
from fer_pipeline.components.evaluator import with_votes
from fer_pipeline.components.example_gen import run_example_gen, shard_paths
from fer_pipeline.components.trainer.models import build_model
from fer_pipeline.components.transform import run_transform
from fer_pipeline.components.tuner.search import head_of
from fer_pipeline.core.config import IngestConfig, load_config
from fer_pipeline.core.contract import (FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_TARGET,
                                        FEATURE_IMAGE, FEATURE_LABEL, NUM_PIXELS)
from fer_pipeline.core.ferplus_votes import ferplus_metrics
from fer_pipeline.core.training_data import Targets, make_dataset, read_targets, split_pattern
from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.pipeline.synthetic_ferplus import generate_ferplus_votes


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    d = tmp_path_factory.mktemp("ferplus_training")
    generate_csv(str(d / "fer.csv"), rows=120, seed=9)
    generate_ferplus_votes(str(d / "fer.csv"), str(d / "votes.csv"), seed=4,
                           contempt_fraction=0.1)
    run_example_gen(str(d / "fer.csv"), str(d / "examples"), IngestConfig(
        ferplus_labels=str(d / "votes.csv"), ferplus_mode="crossentropy"), [])
    return d


def _raw(examples_dir, split):
    return [tf.train.Example.FromString(r.numpy()).features.feature
            for r in tf.data.TFRecordDataset(shard_paths(str(examples_dir), split))]


def test_transform_trains_on_the_majority_and_the_vote_distribution(ingested):
    examples = str(ingested / "examples")
    # The raw train split stands in for the augmented one: transform reads <dir>/train.
    result = run_transform(examples, examples, str(ingested / "transform"),
                           load_config(profile="smoke").transform, [])
    assert result.ferplus["classes"] == 8 and result.ferplus["mode"] == "crossentropy"
    targets = read_targets(str(ingested / "transform"))
    assert (targets.num_classes, targets.target, targets.soft) == (8, "distribution", True)
    spec = {FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_FERPLUS_TARGET: tf.io.FixedLenFeature([8], tf.float32)}
    for split in ("train", "test"):
        raw = _raw(examples, split)
        records = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(
            tf.io.gfile.glob(split_pattern(str(ingested / "transform"), split)))]
        # Transform keeps the record order within a split's single shard set; compare as
        # multisets so sharding cannot matter.
        assert sorted(int(r[FEATURE_LABEL]) for r in records) == sorted(
            f[FEATURE_FERPLUS_MAJORITY].int64_list.value[0] for f in raw)
        expected = sorted(tuple(np.round(np.array(f["ferplus_votes"].int64_list.value[:8])
                                         / sum(f["ferplus_votes"].int64_list.value[:8]), 4))
                          for f in raw)
        assert sorted(tuple(np.round(r[FEATURE_FERPLUS_TARGET].numpy().astype(np.float64), 4))
                      for r in records) == expected
    soft = next(iter(make_dataset(split_pattern(str(ingested / "transform"), "train"), 8,
                                  training=True, seed=1, targets=targets)))
    assert soft[1].shape == (8, 8) and soft[1].dtype == tf.float32
    np.testing.assert_allclose(soft[1].numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_augment_counts_the_label_training_uses(ingested):
    for feature in _raw(ingested / "examples", "train")[:20]:
        example = tf.train.Example(features=tf.train.Features(feature=dict(feature)))
        label, _ = _key_by_class(example.SerializeToString())
        assert label == feature[FEATURE_FERPLUS_MAJORITY].int64_list.value[0]


def _write_transformed(path, distributions, majority):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for distribution in distributions:
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                FEATURE_IMAGE: tf.train.Feature(float_list=tf.train.FloatList(
                    value=[0.0] * NUM_PIXELS)),
                FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[majority])),
                FEATURE_FERPLUS_TARGET: tf.train.Feature(float_list=tf.train.FloatList(
                    value=distribution)),
            })).SerializeToString())


def test_probability_mode_draws_a_label_from_the_votes_every_epoch(tmp_path):
    # Every face: 70 % happy (3), 30 % neutral (6); the majority is happy.
    distribution = [0, 0, 0, 0.7, 0, 0, 0.3, 0]
    _write_transformed(tmp_path / "examples-00000-of-00001.tfrecord", [distribution] * 400, 3)
    pattern = str(tmp_path / "examples-*.tfrecord")
    draw = Targets(8, "draw")
    ds = make_dataset(pattern, 100, training=True, seed=3, targets=draw)
    epochs = [np.concatenate([labels.numpy() for _, labels in ds]) for _ in range(2)]
    for labels in epochs:
        assert set(labels) == {3, 6}
        assert 0.6 < (labels == 3).mean() < 0.8
    assert (epochs[0] != epochs[1]).any()          # drawn afresh each epoch
    again = make_dataset(pattern, 100, training=True, seed=3, targets=draw)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in again]), epochs[0])
    validation = make_dataset(pattern, 100, training=False, seed=3, targets=draw)
    assert set(np.concatenate([y.numpy() for _, y in validation])) == {3}


def test_the_head_has_eight_outputs_and_learns_soft_targets():
    config = load_config(profile="smoke").train
    model = build_model("cnn", config, jit_compile=False, num_classes=8, soft_targets=True)
    assert model.output_shape == (None, 8)
    images = np.random.default_rng(0).normal(size=(16, NUM_PIXELS)).astype(np.float32)
    targets = np.tile(np.array([[0, 0, 0, 0.5, 0, 0, 0.25, 0.25]], np.float32), (16, 1))
    history = model.fit(images, targets, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "accuracy" in history.history
    assert build_model("cnn", config, jit_compile=False).output_shape == (None, 7)
    # The tuner builds its trials with the same head.
    assert head_of(Targets()) == {}
    assert head_of(Targets(8, "distribution")) == {"num_classes": 8, "soft_targets": True}


def test_evaluation_against_the_votes():
    # angry, disgust, fear, happy, sad, surprise, neutral, contempt, unknown, not_face
    votes = np.array([[0, 0, 0, 8, 0, 0, 2, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0, 5, 4, 1, 0]])
    probs = np.array([[0.0, 0, 0, 0.8, 0, 0, 0.2, 0],
                      [0.0, 0, 0, 0, 0, 0, 0.4, 0.6]])
    metrics = ferplus_metrics(votes, probs)
    assert metrics["accuracy_majority"] == 0.5 and metrics["classes"] == 8
    # -(0.8 ln 0.8 + 0.2 ln 0.2) and -(5/9 ln 0.4 + 4/9 ln 0.6), averaged.
    expected = (-(0.8 * np.log(0.8) + 0.2 * np.log(0.2))
                - (5 / 9 * np.log(0.4) + 4 / 9 * np.log(0.6))) / 2
    assert metrics["cross_entropy"] == pytest.approx(expected, rel=1e-6)
    gallery = with_votes({"happy": [{"index": 1}]}, votes)
    assert gallery["happy"][0]["votes"] == {"neutral": 5, "contempt": 4, "unknown": 1}
    assert with_votes({"happy": [{"index": 1}]}, None) == {"happy": [{"index": 1}]}
