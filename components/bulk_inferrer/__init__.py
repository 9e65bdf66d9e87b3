"""BulkInferrer: every face of a FER-2013 CSV or a directory of photos scored by the served
models on Beam (executor.py: reading.py, scoring.py), combined by the ensemble rule, written
by Beam sinks as shards and committed as one output (outputs.py, counts.py, review.py)."""
from fer_pipeline.components.bulk_inferrer.executor import run_bulk_inferrer
from fer_pipeline.components.bulk_inferrer.outputs import csv_rows, prediction_order, read_committed
from fer_pipeline.components.bulk_inferrer.records import BulkInferenceResult, ModelVersion

__all__ = ["run_bulk_inferrer", "BulkInferenceResult", "ModelVersion", "csv_rows",
           "prediction_order", "read_committed"]
