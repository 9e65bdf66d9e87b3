"""Evaluator: every trained model and the ensemble scored on the test split, and the gate that
decides which may ship (executor.py; split.py, predictions.py, metrics.py, ensemble.py,
ferplus.py, gate.py)."""
from fer_pipeline.components.evaluator.ensemble import (MISTAKES_PER_CLASS, confidence_gaps,
    ensemble_metrics)
from fer_pipeline.components.evaluator.executor import EvalResult, run_evaluator
from fer_pipeline.components.evaluator.ferplus import with_votes
from fer_pipeline.components.evaluator.predictions import write_test_predictions
from fer_pipeline.components.evaluator.split import load_test_split

__all__ = ["run_evaluator", "EvalResult", "load_test_split", "write_test_predictions",
           "with_votes", "ensemble_metrics", "confidence_gaps", "MISTAKES_PER_CLASS"]
