"""The synthetic FER-2013 generator: format, proportions, determinism, label-dependent faces."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from fer_pipeline.pipeline.synthetic import (
    FER_CLASS_COUNTS, FER_USAGE_COUNTS, allocate, draw_faces, generate_csv)
from fer_pipeline.core.contract import CLASS_NAMES, IMAGE_SIZE, NUM_PIXELS


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "fer.csv"
    result = generate_csv(str(path), rows=700, seed=3)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return result, rows


def test_csv_has_fer2013_format(generated):
    result, rows = generated
    assert rows[0] == ["emotion", "pixels", "Usage"]
    assert len(rows) == 1 + 700 == 1 + result.rows
    for label, pixels, usage in rows[1:]:
        assert 0 <= int(label) <= 6
        values = [int(v) for v in pixels.split(" ")]
        assert len(values) == NUM_PIXELS
        assert min(values) >= 0 and max(values) <= 255
        assert usage in FER_USAGE_COUNTS


def test_label_and_usage_proportions_match_fer2013(generated):
    result, rows = generated
    labels = [CLASS_NAMES[int(r[0])] for r in rows[1:]]
    usage = [r[2] for r in rows[1:]]
    expected_labels = allocate(FER_CLASS_COUNTS, 700)
    assert {c: labels.count(c) for c in CLASS_NAMES} == expected_labels == result.label_counts
    assert {u: usage.count(u) for u in FER_USAGE_COUNTS} == allocate(FER_USAGE_COUNTS, 700)
    assert expected_labels["happy"] == round(700 * 8989 / 35887)
    assert expected_labels["disgust"] == round(700 * 547 / 35887)


def test_allocate_at_full_size_gives_the_real_counts():
    assert allocate(FER_CLASS_COUNTS, 35887) == FER_CLASS_COUNTS
    assert allocate(FER_USAGE_COUNTS, 35887) == FER_USAGE_COUNTS


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    paths = [tmp_path / name for name in ("a.csv", "b.csv", "c.csv")]
    generate_csv(str(paths[0]), rows=50, seed=11)
    generate_csv(str(paths[1]), rows=50, seed=11)
    generate_csv(str(paths[2]), rows=50, seed=12)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_without_usage_column(tmp_path):
    path = tmp_path / "no_usage.csv"
    result = generate_csv(str(path), rows=20, seed=0, include_usage=False)
    lines = path.read_text().splitlines()
    assert lines[0] == "emotion,pixels"
    assert all(line.count(",") == 1 for line in lines)
    assert result.usage_counts == {}


def test_faces_depend_on_label_and_are_distinct():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 300)
    images = draw_faces(labels, rng)
    assert images.shape == (len(labels), IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.uint8
    means = np.stack([images[labels == k].astype(np.float64).mean(axis=0) for k in range(7)])
    # Every pair of classes differs clearly in its mean face (mouth, brows, eyes).
    for a in range(7):
        for b in range(a + 1, 7):
            assert np.abs(means[a] - means[b]).max() > 8.0, (CLASS_NAMES[a], CLASS_NAMES[b])
    # The expression is a small part of the image: within-class variation dwarfs it, so
    # the task is not trivial.
    assert images.astype(np.float64).std(axis=0).mean() > 20.0
    flat = {img.tobytes() for img in images}
    assert len(flat) == len(images), "exact duplicate images by chance"


def test_draw_faces_rejects_bad_labels():
    with pytest.raises(ValueError):
        draw_faces(np.array([0, 7]), np.random.default_rng(0))


def test_the_synth_command_says_what_it_wrote_in_words(tmp_path, capsys):
    from fer_pipeline.pipeline.cli import main

    path = tmp_path / "fer.csv"
    assert main(["synth", "--rows", "50", "--out", str(path), "--seed", "4"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    counts = {name: sum(int(r["emotion"]) == k for r in rows)
              for k, name in enumerate(CLASS_NAMES)}
    assert line.startswith(f"[fer-pipeline] wrote 50 synthetic faces (seed 4) to {path} in ")
    assert ", ".join(f"{name} {n}" for name, n in counts.items()) in line
    assert "Training" in line and "SynthResult" not in line
