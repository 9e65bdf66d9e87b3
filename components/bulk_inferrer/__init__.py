"""BulkInferrer: every face of a FER-2013 CSV or a directory of photos scored by the served
models on Beam (executor.py), combined by the ensemble rule, written out (outputs.py)."""
from fer_pipeline.components.bulk_inferrer.executor import run_bulk_inferrer
from fer_pipeline.components.bulk_inferrer.records import BulkInferenceResult, ModelVersion

__all__ = ["run_bulk_inferrer", "BulkInferenceResult", "ModelVersion"]
