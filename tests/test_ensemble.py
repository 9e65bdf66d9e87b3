"""The ensemble decision rule: single-image `combine` and its vectorized twin agree."""
from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline.core.contract import CLASS_NAMES, CLASS_NAMES_ES, NUM_CLASSES
from fer_pipeline.core.ensemble import combine, combine_batch


def one_hot_ish(class_id: int, confidence: float) -> list[float]:
    """A probability vector whose top class is `class_id` with probability `confidence`."""
    rest = (1.0 - confidence) / (NUM_CLASSES - 1)
    probs = [rest] * NUM_CLASSES
    probs[class_id] = confidence
    return probs


def test_agreement_takes_the_highest_confidence():
    decision = combine({"cnn": one_hot_ish(3, 0.6), "vgg16": one_hot_ish(3, 0.9)}, 0.05)
    assert decision.class_id == 3
    assert decision.class_name == CLASS_NAMES[3] == "happy"
    assert decision.class_name_es == CLASS_NAMES_ES[3] == "Felicidad"
    assert decision.confidence == pytest.approx(0.9)
    assert decision.winner == "vgg16"
    assert not decision.needs_human_review
    assert decision.per_model["cnn"] == {"class_id": 3, "confidence": pytest.approx(0.6)}
    assert "agree" in decision.reason


def test_disagreement_with_a_clear_margin_goes_to_the_more_confident_model():
    decision = combine({"cnn": one_hot_ish(0, 0.8), "vgg16": one_hot_ish(4, 0.5)}, 0.05)
    assert (decision.class_id, decision.winner) == (0, "cnn")
    assert not decision.needs_human_review


def test_close_disagreement_needs_review_but_still_reports_the_top_class():
    decision = combine({"cnn": one_hot_ish(0, 0.52), "vgg16": one_hot_ish(4, 0.55)}, 0.05)
    assert decision.needs_human_review
    assert decision.class_id == 4 and decision.winner == "vgg16"
    assert "human review" in decision.reason


def test_gap_exactly_at_tolerance_counts_as_within():
    # 0.55 - 0.50 is not exactly 0.05 in floating point; the rule must still flag it.
    decision = combine({"a": one_hot_ish(1, 0.50), "b": one_hot_ish(2, 0.55)}, 0.05)
    assert decision.needs_human_review


def test_rival_is_the_most_confident_dissenter_not_the_second_model():
    # a and b agree (0.9, 0.88); c disagrees at 0.5: far from 0.9, so no review even though
    # the runner-up overall (b) is within tolerance of the winner.
    decision = combine({"a": one_hot_ish(5, 0.9), "b": one_hot_ish(5, 0.88),
                        "c": one_hot_ish(6, 0.5)}, 0.05)
    assert decision.class_id == 5 and not decision.needs_human_review


def test_single_model_and_bad_input():
    decision = combine({"cnn": one_hot_ish(6, 0.4)}, 0.05)
    assert decision.class_id == 6 and not decision.needs_human_review
    with pytest.raises(ValueError):
        combine({}, 0.05)
    with pytest.raises(ValueError, match="expected 7"):
        combine({"cnn": [0.5, 0.5]}, 0.05)


def test_batch_matches_single_image_rule_on_random_inputs():
    rng = np.random.default_rng(0)
    n = 500
    # Peaked Dirichlet draws make all three outcomes (agree, clear win, review) common.
    probs = {name: rng.dirichlet(np.full(NUM_CLASSES, 0.3), size=n) for name in ("a", "b", "c")}
    class_ids, confidences, review = combine_batch(probs, 0.1)
    assert class_ids.shape == confidences.shape == review.shape == (n,)
    for i in range(n):
        decision = combine({name: p[i] for name, p in probs.items()}, 0.1)
        assert class_ids[i] == decision.class_id
        assert confidences[i] == pytest.approx(decision.confidence)
        assert review[i] == decision.needs_human_review
    # The test means something only if every branch was exercised.
    assert 0 < review.sum() < n


def test_batch_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        combine_batch({"a": np.zeros((3, NUM_CLASSES)), "b": np.zeros((4, NUM_CLASSES))}, 0.05)


def fer_plus(class_id: int, confidence: float) -> list[float]:
    """An 8-class (FER+, with contempt) vector whose top class is `class_id`."""
    probs = [(1.0 - confidence) / 7] * 8
    probs[class_id] = confidence
    return probs


def test_eight_class_models_combine_with_fer_plus_names():
    # Class 7 exists only in FER+: the decision names it, in both languages.
    decision = combine({"cnn": fer_plus(7, 0.7), "vgg16": fer_plus(7, 0.6)}, 0.05)
    assert (decision.class_id, decision.class_name, decision.class_name_es) == (
        7, "contempt", "Desprecio")
    assert "agree on contempt" in decision.reason
    tie = combine({"cnn": fer_plus(7, 0.52), "vgg16": fer_plus(0, 0.55)}, 0.05)
    assert tie.needs_human_review and "cnn: contempt 0.520" in tie.reason
    ids, _, review = combine_batch({"cnn": np.array([fer_plus(7, 0.52)]),
                                    "vgg16": np.array([fer_plus(0, 0.55)])}, 0.05)
    assert ids.tolist() == [0] and review.tolist() == [True]


def test_a_seven_and_an_eight_class_model_are_refused_in_one_line():
    from fer_pipeline.core.ensemble import ClassSetMismatch
    from fer_pipeline.core.errors import UserError
    for call in (lambda: combine({"cnn": one_hot_ish(3, 0.9), "vgg16": fer_plus(3, 0.9)}, 0.05),
                 lambda: combine_batch({"cnn": np.array([one_hot_ish(3, 0.9)]),
                                        "vgg16": np.array([fer_plus(3, 0.9)])}, 0.05)):
        with pytest.raises(ClassSetMismatch) as caught:
            call()
        message = str(caught.value)
        assert isinstance(caught.value, UserError) and "\n" not in message
        assert "cnn has 7, vgg16 has 8 classes" in message
        assert "ingest.ferplus_classes" in message
