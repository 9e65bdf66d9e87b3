"""`fer-pipeline run --profile smoke --ferplus-labels votes.csv` with FER+'s eighth class:
one CNN-only run on the session's small synthetic CSV and synthetic votes, from ingest to
push, and what each step made of the votes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tensorflow as tf

from fer_pipeline.core.contract import (CLASS_NAMES_FERPLUS, OUTPUT_PROBABILITIES,
                                        SIGNATURE_UINT8)
from fer_pipeline.pipeline import cli
from fer_pipeline.pipeline.runner import committed_output
from fer_pipeline.pipeline.synthetic_ferplus import generate_ferplus_votes


@pytest.fixture(scope="module")
def run(small_csv, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ferplus_run")
    votes = work / "fer2013new.csv"
    generate_ferplus_votes(small_csv, str(votes), seed=3)
    config = work / "config.json"
    config.write_text(json.dumps({"ingest": {"ferplus_classes": 8,
                                             "ferplus_mode": "probability"}}))
    root = work / "run"
    assert cli.main(["run", "--data", small_csv, "--ferplus-labels", str(votes),
                     "--output", str(root), "--profile", "smoke", "--config", str(config),
                     "--models", "cnn"]) == 0
    return root


def _out(root: Path, step: str) -> Path:
    return Path(committed_output(str(root), step))


def test_the_votes_flow_from_ingest_to_an_eight_class_served_model(run):
    ingest = json.loads((_out(run, "ingest") / "manifest.json").read_text())["result"]
    assert ingest["ferplus"]["classes"] == 8 and ingest["ferplus"]["mode"] == "probability"
    assert ingest["ferplus"]["labels_path"].endswith("fer2013new.csv")
    assert "FER-2013 labels against FER+ votes" in (
        _out(run, "statistics") / "statistics.html").read_text()
    info = json.loads((_out(run, "train-cnn") / "training_info.json").read_text())
    assert info["targets"]["num_classes"] == 8 and info["targets"]["target"] == "draw"

    evaluation = json.loads((_out(run, "evaluate") / "evaluation.json").read_text())
    cnn = evaluation["models"]["cnn"]
    assert [row["class_name"] for row in cnn["per_class"]] == list(CLASS_NAMES_FERPLUS)
    assert 0.0 <= cnn["ferplus"]["accuracy_majority"] <= 1.0
    assert cnn["ferplus"]["cross_entropy"] > 0 and cnn["ferplus"]["classes"] == 8
    shown = [face for faces in cnn["mistakes"].values() for face in faces]
    assert shown and all(sum(face["votes"].values()) == 10 for face in shown)
    assert "FER+: " in (_out(run, "evaluate") / "report.html").read_text()

    model = tf.saved_model.load(str(_out(run, "train-cnn") / "serving_model"))
    answer = model.signatures[SIGNATURE_UINT8](pixels=tf.zeros([2, 48, 48], tf.uint8))
    assert answer[OUTPUT_PROBABILITIES].shape == (2, 8)
