"""core/calibration.py in pure numpy: the temperature fit, ECE, reliability bins, the records."""
from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline.core.calibration import (ECE_BINS, calibration_record, ensemble_calibration,
    expected_calibration_error, fit_temperature, fitted_temperature, logits_from_probabilities,
    model_calibration, negative_log_likelihood, reliability_bins, softmax)


def _sampled(temperature: float, n: int = 20000, classes: int = 7, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): the model that
    outputs softmax(logits) is miscalibrated by exactly that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, classes))
    truth = softmax(logits, temperature)
    # Inverse-CDF sampling, one uniform draw per face.
    labels = (truth.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return logits, np.minimum(labels, classes - 1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.5])
def test_the_fit_recovers_a_known_temperature(temperature):
    logits, labels = _sampled(temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.06)
    # It is the minimum of the NLL: a little either side is worse.
    nll = negative_log_likelihood(logits, labels, fitted)
    assert nll <= negative_log_likelihood(logits, labels, fitted * 1.05)
    assert nll <= negative_log_likelihood(logits, labels, fitted / 1.05)


def test_scaling_keeps_the_top_class_and_calibrates():
    logits, labels = _sampled(2.5)
    record = calibration_record(logits, labels)
    assert record["calibrated"] and record["examples"] == len(labels)
    assert record["at_bound"] is False
    # Labels unrelated to the logits: no temperature beats the uniform answer, T hits the top.
    noise = calibration_record(logits, np.random.default_rng(5).permutation(labels))
    assert noise["at_bound"] is True and noise["temperature"] == pytest.approx(50.0, rel=1e-3)
    assert record["after"]["nll"] < record["before"]["nll"]
    assert record["after"]["ece"] < 0.02 < 0.1 < record["before"]["ece"]
    np.testing.assert_array_equal(softmax(logits, record["temperature"]).argmax(axis=1),
                                  logits.argmax(axis=1))
    assert fitted_temperature({"calibration": record}) == record["temperature"]


def test_no_validation_data_means_not_calibrated():
    record = calibration_record(None, np.zeros(0, np.int64))
    assert record == {"calibrated": False, "temperature": 1.0, "split": "validation",
                      "reason": "no validation data to fit a temperature on: not calibrated"}
    assert fitted_temperature({"calibration": record}) is None
    assert fitted_temperature(None) is None
    assert fit_temperature(np.zeros((0, 7)), np.zeros(0, np.int64)) == 1.0


def test_ece_of_a_hand_checked_example():
    """Three classes, four faces: two at confidence 0.9 (one right), one at 0.65 (right),
    one at 0.5 (wrong). Bins of width 1/15: 0.9 -> bin 13, 0.65 -> bin 9, 0.5 -> bin 7.
    ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.65| + 1/4 |0 - 0.5| = 0.2 + 0.0875 + 0.125."""
    probabilities = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05],
                              [0.65, 0.25, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 0, 2])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4125)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == ECE_BINS
    filled = {i: b for i, b in enumerate(bins) if b["count"]}
    assert sorted(filled) == [7, 9, 13]
    assert (filled[13]["count"], filled[13]["confidence"], filled[13]["accuracy"]) == (
        2, pytest.approx(0.9), 0.5)
    assert (filled[9]["lower"], filled[9]["upper"]) == (pytest.approx(9 / 15),
                                                        pytest.approx(10 / 15))
    assert all(b["confidence"] is None and b["accuracy"] is None
               for i, b in enumerate(bins) if i not in filled)
    # Perfectly calibrated: every face at confidence 1 and right.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_log_probabilities_stand_in_for_logits():
    logits, _ = _sampled(1.0, n=50)
    probabilities = softmax(logits)
    for temperature in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(softmax(logits_from_probabilities(probabilities), temperature),
                                   softmax(logits, temperature), atol=1e-9)


def test_model_and_ensemble_before_and_after():
    logits_a, labels = _sampled(2.0, n=4000, seed=1)
    logits_b = logits_a[:, ::-1] * 0.5          # a second, weaker and differently scaled model
    calibrated = {"a": softmax(logits_a, 2.0), "b": softmax(logits_b, 0.7)}
    one = model_calibration(labels, logits_a, calibrated["a"], temperature=2.0)
    assert one["temperature"] == 2.0 and one["bins_count"] == ECE_BINS
    assert one["after"]["ece"] < one["before"]["ece"]
    assert one["after"]["ece"] == pytest.approx(
        expected_calibration_error(calibrated["a"], labels))
    assert sum(b["count"] for b in one["before"]["bins"]) == len(labels)
    both = ensemble_calibration(labels, {"a": logits_a, "b": logits_b}, calibrated, 0.05)
    for when in ("before", "after"):
        assert set(both[when]) >= {"accuracy", "human_review_rate", "ece", "nll", "bins"}
        assert 0.0 <= both[when]["ece"] <= 1.0
