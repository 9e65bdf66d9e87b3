"""What tests/test_engines.py runs on: a small dirty CSV, its DirectRunner reference run, and
one local cluster at a time (tools/local_cluster.py).

`cluster` is parametrized over the engines at module scope, so pytest runs every test of
one engine, stops that cluster, and only then starts the next: on 2 cores two clusters at
once would only slow each other. Each cluster is started on free ports (beside any cluster
a user started with `make flink-up`, which uses the default ports) in the module's temp
directory. The jars must have been fetched by `make engines`, which `make test` runs first;
without them the tests fail with the one line saying so rather than skip, because on these
machines they are part of the suite.

The CSV is small on purpose (ENGINE_ROWS faces plus the bad rows and the cross-split
duplicate of tests/pipeline_fixtures.py): on an engine each Beam step costs a job's start
(Python SDK workers, scheduling), which dwarfs the data at this size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from fer_pipeline.pipeline.synthetic import generate_csv
from fer_pipeline.pipeline import cli
from tools import local_cluster
from tests.pipeline_fixtures import write_dirty_csv

ENGINES = ["flink", "spark"]       # Flink first: the Flink-only tests rely on its index 0
ENGINE_ROWS = 240
DATA_STEPS = ["ingest", "augment", "statistics", "validate", "transform"]

# The data steps as the smoke profile runs them, except: a small CSV's six bad rows are
# 2.4 % of it (ingest's default limit is 1 %), and the CNN that the Flink run goes on to
# push trains for the least that still runs every step, with a gate it always passes.
# Training is not what these tests check: that the rest of the pipeline continues from an
# engine's outputs is.
ENGINE_CONFIG = {
    "ingest": {"max_rejected_fraction": 0.05},
    "train": {"models": {"cnn": {"epochs": 1, "batch_size": 16, "max_train_examples": 48,
                                 "early_stopping_patience": 0}}},
    "evaluation": {"min_accuracy": {"cnn": 0.0}, "baseline_margin": -1.0},
}


@dataclass
class EngineData:
    csv: str                          # the dirty CSV every run ingests
    config: str                       # ENGINE_CONFIG as a file for --config
    direct_run: str                   # run root of the DirectRunner's data half on it
    bad_lines: dict[int, str] = field(default_factory=dict)   # 1-based line -> kind
    leaked_line: int = 0              # 1-based line of the training face copied into test


@dataclass
class EngineRun:
    engine: str
    cluster: local_cluster.Cluster
    root: str                         # run root of the pipeline run on the cluster


def run_cli(args: list[str]) -> int:
    return cli.main(args)


@pytest.fixture(scope="module")
def engine_data(tmp_path_factory) -> EngineData:
    """The small dirty CSV and the DirectRunner's data half on it (in this process)."""
    work = tmp_path_factory.mktemp("engine_data")
    clean, dirty = str(work / "clean.csv"), str(work / "fer_dirty.csv")
    generate_csv(clean, rows=ENGINE_ROWS, seed=11)
    facts = write_dirty_csv(clean, dirty)
    config = work / "config.json"
    config.write_text(json.dumps(ENGINE_CONFIG))
    direct = str(work / "direct_run")
    assert run_cli(["run", "--data", dirty, "--output", direct, "--profile", "smoke",
                    "--config", str(config), "--steps", ",".join(DATA_STEPS)]) == 0
    return EngineData(csv=dirty, config=str(config), direct_run=direct,
                      bad_lines={int(k): v for k, v in facts["bad_lines"].items()},
                      leaked_line=facts["leaked_line"])


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, tmp_path_factory) -> Iterator[local_cluster.Cluster]:
    """Flink 1.19 (a JobManager and a TaskManager with 2 slots) or Spark 3.2.2 standalone
    (a Master and a Worker with 2 cores), each with Beam's job server and a worker pool."""
    engine = request.param
    state_dir = tmp_path_factory.mktemp(f"{engine}_cluster")
    try:
        started = local_cluster.start(engine, state_dir, local_cluster.Ports.free(engine))
    except local_cluster.ClusterError as error:
        pytest.fail(f"the local {engine} cluster did not start: {error}", pytrace=False)
    try:
        yield started
    finally:
        local_cluster.stop(started)


@pytest.fixture(scope="module")
def engine_run(cluster: local_cluster.Cluster, engine_data: EngineData,
               tmp_path_factory) -> EngineRun:
    """The small CSV through the CLI with the data half on `cluster` (parallelism 2), as
    the README shows; on Flink the run goes on to a pushed CNN."""
    root = str(tmp_path_factory.mktemp(f"{cluster.engine}_run") / "run")
    steps = (["--models", "cnn"] if cluster.engine == "flink"
             else ["--steps", ",".join(DATA_STEPS)])
    status = run_cli(["run", "--data", engine_data.csv, "--output", root, "--profile", "smoke",
                      "--config", engine_data.config, *steps,
                      *cluster.beam_args(parallelism=2)])
    assert status == 0, f"the run on {cluster.engine} failed (see the line above)"
    return EngineRun(cluster.engine, cluster, root)
