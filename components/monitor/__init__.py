"""The monitor: served traffic of a window against the training run of the served versions."""
from fer_pipeline.components.monitor.executor import MonitorResult, run_monitor

__all__ = ["run_monitor", "MonitorResult"]
