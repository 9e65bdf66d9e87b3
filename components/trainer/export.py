"""The trainer's export step: the serving module is core/serving_export.py, shared with
the model importer (components/model_importer.py), since components never import each
other. Kept so the trainer's imports stay where they were."""
from fer_pipeline.core.serving_export import (INTEGRATION_STEPS, ServingModule, TransformGraph,
                                              export_serving_model, integrated_gradients,
                                              save_serving_module)

__all__ = ["INTEGRATION_STEPS", "ServingModule", "TransformGraph", "export_serving_model",
           "integrated_gradients", "save_serving_module"]
