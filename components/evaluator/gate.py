"""The blessing gate: each model's checks (threshold, majority baseline, per-class recall,
calibration error, regression from the served version) and its one-line summary.

The checks compare whatever labels the metrics they are handed were computed against:
FER-2013's, or FER+'s crowd majority (evaluation.gate_labels: ferplus). With FER+'s, every
reason and summary names them, so nobody reads a FER+ figure as a FER-2013 one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from fer_pipeline.core.config import EvalConfig
from fer_pipeline.core.contract import NUM_CLASSES

__all__ = ["Check", "gate", "GATE_LABELS"]

# evaluation.gate_labels -> the name of the accuracy the checks compare.
GATE_LABELS = {"fer2013": "accuracy", "ferplus": "FER+ majority accuracy"}


@dataclass
class Check:
    passed: bool
    reason: str          # what was compared, for the reasons list
    failure: str = ""    # the one-line "why held back" when this check fails


def _threshold_check(name: str, accuracy: float, config: EvalConfig, what: str) -> Check:
    threshold = config.min_accuracy.get(name)
    if threshold is None:
        return Check(False, f"no min_accuracy configured for {name!r}; refusing to bless "
                            "an ungated model",
                     f"no min_accuracy configured for {name}")
    ok = accuracy >= threshold
    return Check(ok, f"{what} {accuracy:.3f} {'>=' if ok else '<'} {threshold:.3f}",
                 f"test {what} {accuracy:.2f} is below its threshold {threshold:.2f}")


def _baseline_check(accuracy: float, baseline: Mapping[str, Any], margin: float,
                    what: str) -> Check:
    floor = baseline["accuracy"] + margin
    ok = accuracy >= floor
    return Check(ok, f"{what} {accuracy:.3f} {'>=' if ok else '<'} {floor:.3f} "
                     f"(majority-class baseline {baseline['accuracy']:.3f}, always "
                     f"{baseline['class_name']!r}, + baseline_margin {margin:.3f})",
                 f"test {what} {accuracy:.2f} does not beat the majority-class baseline "
                 f"{baseline['accuracy']:.2f} by {margin:.2f}")


def _recall_checks(metrics: Mapping[str, Any], floor: float, labels: str) -> list[Check]:
    against = " against FER+'s majority" if labels == "ferplus" else ""
    checks = []
    for row in metrics["per_class"]:
        if row["class_id"] >= NUM_CLASSES and not row["support"]:
            continue   # FER+'s contempt: FER-2013's test labels never name it
        ok = row["recall"] >= floor
        checks.append(Check(ok, f"recall of {row['class_name']} ({row['class_name_es']}) "
                                f"{row['recall']:.3f} {'>=' if ok else '<'} {floor:.3f}"
                                f"{against}",
                            f"recall of {row['class_name']}{against} {row['recall']:.2f} "
                            f"is below {floor:.2f}"))
    return checks


def _regression_check(accuracy: float, served: Optional[Mapping[str, Any]],
                      max_regression: float, what: str) -> Check:
    if served is None:
        return Check(True, "no version in serving: regression check not applicable")
    floor = served["accuracy"] - max_regression
    ok = accuracy >= floor
    return Check(ok, f"{what} {accuracy:.3f} {'>=' if ok else '<'} {floor:.3f} "
                     f"(served version {served['version']}: {served['accuracy']:.3f} - "
                     f"max_regression {max_regression:.3f})",
                 f"test {what} {accuracy:.2f} regresses from served version "
                 f"{served['version']} ({served['accuracy']:.2f}) by more than "
                 f"{max_regression:.2f}")


def _ece_check(calibration: Mapping[str, Any], max_ece: float, labels: str) -> Check:
    """The served (calibrated) probabilities' expected calibration error on the test split."""
    ece = calibration["after"]["ece"]
    against = ", against FER+'s majority" if labels == "ferplus" else ""
    ok = ece <= max_ece
    return Check(ok, f"expected calibration error {ece:.3f} {'<=' if ok else '>'} max_ece "
                     f"{max_ece:.3f} (calibrated probabilities, "
                     f"{calibration['bins_count']} bins{against})",
                 f"calibration error (ECE){against.lstrip(',')} {ece:.3f} is above max_ece "
                 f"{max_ece:.3f}")


def gate(name: str, metrics: Mapping[str, Any], served: Optional[Mapping[str, Any]],
         config: EvalConfig, baseline: Optional[Mapping[str, Any]] = None
         ) -> tuple[bool, list[str], str]:
    """Applies the thresholds to `metrics`, `served` and `baseline`, which the caller
    computed against the labels config.gate_labels names.

    Returns (blessed, one human-readable reason per check, a one-line summary naming the
    model and, when it is held back, every check it failed).
    """
    accuracy, labels = metrics["accuracy"], config.gate_labels
    what = GATE_LABELS[labels]
    checks = [_threshold_check(name, accuracy, config, what)]
    if baseline is not None:
        checks.append(_baseline_check(accuracy, baseline, config.baseline_margin, what))
    if config.min_class_recall is not None:
        checks += _recall_checks(metrics, config.min_class_recall, labels)
    if config.max_ece is not None and "calibration" in metrics:
        checks.append(_ece_check(metrics["calibration"], config.max_ece, labels))
    checks.append(_regression_check(accuracy, served, config.max_regression, what))
    blessed = all(c.passed for c in checks)
    return blessed, [c.reason for c in checks], _summary(name, accuracy, checks, blessed, what)


def _summary(name: str, accuracy: float, checks: list[Check], blessed: bool,
             what: str) -> str:
    if blessed:
        return (f"{name} blessed: test {what} {accuracy:.2f} passed all {len(checks)} "
                "checks")
    return f"{name} held back: " + "; ".join(c.failure for c in checks if not c.passed)
