"""Session-scoped local Flink and Spark clusters (pipeline/local_cluster.py) for the tests.

Each is started once per test session on free ports (beside any cluster a user started
with `make flink-up`, which uses the default ports), in the session's temp directory, and
stopped when the session ends. The jars must have been fetched by `make engines`, which
`make test` runs first; without them the engine tests fail with the one line saying so
rather than skip, because on these machines they are part of the suite.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from pipeline import local_cluster


def _cluster(engine: str, tmp_path_factory) -> Iterator[local_cluster.Cluster]:
    state_dir = tmp_path_factory.mktemp(f"{engine}_cluster")
    try:
        cluster = local_cluster.start(engine, state_dir, local_cluster.Ports.free(engine))
    except local_cluster.ClusterError as error:
        pytest.fail(f"the local {engine} cluster did not start: {error}", pytrace=False)
    try:
        yield cluster
    finally:
        local_cluster.stop(cluster)


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory) -> Iterator[local_cluster.Cluster]:
    """Flink: a JobManager and a TaskManager (2 slots), Beam's job server, a worker pool."""
    yield from _cluster("flink", tmp_path_factory)


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory) -> Iterator[local_cluster.Cluster]:
    """Spark standalone: a Master and a Worker (2 cores), Beam's job server, a worker pool."""
    yield from _cluster("spark", tmp_path_factory)
