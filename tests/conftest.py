"""Shared fixtures. Component tests add their own fixtures in their own files."""
from __future__ import annotations

import os

# Keep TF quiet and deterministic-ish in tests; 2 cores on CI.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest

# The session-scoped S3 server fixture `s3` (tests/object_store.py), for any test module,
# and the hooks that keep tensorflow-io's S3 teardown crash out of the exit status.
from tests.object_store import s3, pytest_sessionfinish, pytest_unconfigure  # noqa: F401,E402
from tests.pipeline_fixtures import (SmokeRun, build_or_reuse_smoke_run,  # noqa: E402
                                     session_shared_dir)


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> str:
    """A 1,200-row synthetic FER-2013 CSV shared by tests that only need valid data."""
    from components.synthetic import generate_csv

    path = tmp_path_factory.mktemp("data") / "fer_small.csv"
    generate_csv(str(path), rows=1200, seed=7)
    return str(path)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One small full pipeline run (smoke profile, dirty CSV, both models trained, evaluated
    and judged, blessed ones pushed), built once per session, even across xdist workers.
    Read-only: tests copy what they change (tests/pipeline_fixtures.py)."""
    return build_or_reuse_smoke_run(session_shared_dir(tmp_path_factory))
