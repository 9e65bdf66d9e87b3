"""ExampleGen: FER-2013 CSVs (executor.py) and labelled image folders (images.py) in,
split, quarantined, de-duplicated TFRecords out."""
from fer_pipeline.components.example_gen.executor import (
    ExampleGenResult, ReadChunkLines, TooManyRejectedRows, combine_csvs, plan_chunks,
    run_example_gen, shard_paths, source_of, split_boundaries)

__all__ = ["run_example_gen", "ExampleGenResult", "TooManyRejectedRows", "ReadChunkLines",
           "combine_csvs", "plan_chunks", "shard_paths", "source_of", "split_boundaries"]
