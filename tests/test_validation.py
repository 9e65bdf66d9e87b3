"""ExampleValidator against the checked-in schema, on statistics of hand-written examples."""
from __future__ import annotations

import json
import os

import pytest
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import schema_pb2

from fer_pipeline.components.statistics.executor import run_statistics
from fer_pipeline.components.validation import (DRIFT_FILE, VALIDATION_REPORT, DataValidationError,
                                   raise_if_blocking, run_validation)
from fer_pipeline.core.config import ValidationConfig
from fer_pipeline.core.contract import (FEATURE_FERPLUS_CLEAR, FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_VOTES,
    FEATURE_LABEL, FEATURE_PIXELS, FEATURE_USAGE, NUM_PIXELS)
from tests.test_statistics import balanced_labels, write_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(REPO, ValidationConfig.schema_path)


def statistics_for(root, name: str, **splits) -> str:
    """Writes each split's examples with write_split(**kwargs), returns the statistics dir."""
    examples = str(root / name / "examples")
    for split, kwargs in splits.items():
        write_split(examples, split, **kwargs)
    out = str(root / name / "statistics")
    run_statistics(examples, None, None, out, None, [])
    return out


@pytest.fixture(scope="module")
def clean_stats(tmp_path_factory) -> str:
    """test has usage "" as when the CSV has no Usage column (random split mode)."""
    return statistics_for(tmp_path_factory.mktemp("v"), "clean",
                          train={"labels": balanced_labels(140), "seed": 1},
                          validation={"labels": balanced_labels(70), "seed": 2},
                          test={"labels": balanced_labels(70), "seed": 3, "usage": b""})


@pytest.fixture(scope="module")
def broken_stats(tmp_path_factory) -> str:
    """validation: one label 9 and one 2000-pixel image; test: no `usage` feature."""
    labels = balanced_labels(70)
    labels[5] = 9
    return statistics_for(tmp_path_factory.mktemp("v"), "broken",
                          train={"labels": balanced_labels(140), "seed": 1},
                          validation={"labels": labels, "seed": 2,
                                      "pixel_counts": {3: 2000}},
                          test={"labels": balanced_labels(70), "seed": 3,
                                "drop": [FEATURE_USAGE]})


@pytest.fixture(scope="module")
def skewed_stats(tmp_path_factory) -> str:
    """validation is 40/70 'happy' (3): 0.571 - 1/7 = 0.43 L-infinity from train."""
    skewed = [3] * 40 + balanced_labels(30)
    return statistics_for(tmp_path_factory.mktemp("v"), "skewed",
                          train={"labels": balanced_labels(140), "seed": 1},
                          validation={"labels": skewed, "seed": 2})


def test_schema_file_parses_and_says_what_we_check():
    schema = tfdv.load_schema_text(SCHEMA)
    label = tfdv.get_feature(schema, FEATURE_LABEL)
    assert (label.int_domain.min, label.int_domain.max) == (0, 6)
    assert label.int_domain.is_categorical
    pixels = tfdv.get_feature(schema, FEATURE_PIXELS)
    assert pixels.type == schema_pb2.INT
    assert (pixels.value_count.min, pixels.value_count.max) == (NUM_PIXELS, NUM_PIXELS)
    assert (pixels.int_domain.min, pixels.int_domain.max) == (0, 255)
    # Every feature is required except FER+'s votes, which only a run with a vote file has.
    optional = {FEATURE_FERPLUS_VOTES, FEATURE_FERPLUS_MAJORITY, FEATURE_FERPLUS_CLEAR}
    assert {f.name for f in schema.feature} >= optional
    assert all(f.presence.min_fraction == 1.0 for f in schema.feature if f.name not in optional)
    assert all(f.presence.min_count == 0 and f.presence.min_fraction == 0.0
               for f in schema.feature if f.name in optional)


def test_clean_data_passes(clean_stats, tmp_path):
    result = run_validation(clean_stats, SCHEMA, str(tmp_path), ValidationConfig())
    assert result.anomalies == {"train": {}, "validation": {}, "test": {}}
    assert not result.blocking
    assert result.drift["validation"].linf == 0.0
    assert result.drift["test"].tfdv_linf == 0.0
    for split in ("train", "validation", "test"):
        assert os.path.exists(tmp_path / f"{split}.anomalies.pbtxt")
    report = (tmp_path / VALIDATION_REPORT).read_text()
    assert "[validation] 70 examples: no anomalies" in report
    raise_if_blocking(result)  # does not raise


def test_broken_data_is_reported_and_blocks(broken_stats, tmp_path):
    result = run_validation(broken_stats, SCHEMA, str(tmp_path), ValidationConfig())
    assert result.blocking
    assert result.anomalies["train"] == {}
    assert set(result.anomalies["validation"]) == {FEATURE_LABEL, FEATURE_PIXELS}
    assert "9" in result.anomalies["validation"][FEATURE_LABEL]
    assert "values per example 2000..2304" in result.anomalies["validation"][FEATURE_PIXELS]
    assert FEATURE_USAGE in result.anomalies["test"]
    report = (tmp_path / VALIDATION_REPORT).read_text()
    for text in ("- emotion: Out-of-range values: Unexpectedly large value: 9.",
                 "- pixels: Missing values", "values per example 2000..2304",
                 "- usage: Column dropped", "BLOCKING"):
        assert text in report
    anomalies = tfdv.load_anomalies_text(str(tmp_path / "validation.anomalies.pbtxt"))
    assert set(anomalies.anomaly_info) == {FEATURE_LABEL, FEATURE_PIXELS}
    with pytest.raises(DataValidationError) as raised:
        raise_if_blocking(result)
    message = str(raised.value)
    assert "--allow-anomalies" in message and "- pixels:" in message


def test_allow_anomalies_reports_without_blocking(broken_stats, tmp_path):
    config = ValidationConfig(allow_anomalies=True)
    result = run_validation(broken_stats, SCHEMA, str(tmp_path), config)
    assert not result.blocking
    assert set(result.anomalies["validation"]) == {FEATURE_LABEL, FEATURE_PIXELS}
    assert "allowed by --allow-anomalies" in (tmp_path / VALIDATION_REPORT).read_text()
    raise_if_blocking(result)


def test_label_skew_is_drift_with_its_distance(skewed_stats, tmp_path):
    result = run_validation(skewed_stats, SCHEMA, str(tmp_path), ValidationConfig())
    happy_share = (40 + balanced_labels(30).count(3)) / 70
    expected = round(happy_share - 1 / 7, 6)
    drift = json.loads((tmp_path / DRIFT_FILE).read_text())
    assert drift["threshold"] == ValidationConfig().label_linf_threshold
    assert drift["comparisons"]["validation"]["linf"] == pytest.approx(expected, abs=1e-6)
    assert drift["comparisons"]["validation"]["tfdv_linf"] == pytest.approx(expected, abs=1e-6)
    assert drift["comparisons"]["validation"]["drifted"] is True
    assert drift["distributions"]["validation"]["3 happy"] == pytest.approx(happy_share)
    assert result.blocking
    assert "DRIFT" in (tmp_path / VALIDATION_REPORT).read_text()


def test_drift_threshold_comes_from_the_config(skewed_stats, tmp_path):
    result = run_validation(skewed_stats, SCHEMA, str(tmp_path),
                            ValidationConfig(label_linf_threshold=0.9))
    assert not result.drift["validation"].drifted
    assert result.anomalies["validation"] == {}
    assert not result.blocking
