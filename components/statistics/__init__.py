"""StatisticsGen: TFDV statistics per split (executor.py) and the statistics page
(page_data.py gathers its numbers and faces, page.py renders them)."""
from fer_pipeline.components.statistics.executor import run_statistics, StatisticsResult

__all__ = ["run_statistics", "StatisticsResult"]
