"""Shared fixtures. Component tests add their own fixtures in their own files."""
from __future__ import annotations

import os

# Keep TF quiet and deterministic-ish in tests; 2 cores on CI.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# What every entry point does first: core/quiet.py's filters, before TensorFlow loads.
from fer_pipeline.core import quiet  # noqa: E402

quiet.install()

from collections import OrderedDict  # noqa: E402

import pytest  # noqa: E402
from xdist.scheduler import LoadFileScheduling  # noqa: E402

# Tests run steps in this process, as fer-pipeline does: with its TensorFlow settings.
from fer_pipeline.core import tf_cpu  # noqa: E402

tf_cpu.prefer_onednn()

# The session-scoped S3 server fixture `s3` (tests/object_store.py), for any test module,
# and the hooks that keep tensorflow-io's S3 teardown crash out of the exit status.
from tests.object_store import s3, pytest_sessionfinish, pytest_unconfigure  # noqa: F401,E402
from tests.pipeline_fixtures import (SmokeRun, build_or_reuse_smoke_run,  # noqa: E402
                                     session_shared_dir)


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory) -> str:
    """A 1,200-row synthetic FER-2013 CSV shared by tests that only need valid data."""
    from fer_pipeline.pipeline.synthetic import generate_csv

    path = tmp_path_factory.mktemp("data") / "fer_small.csv"
    generate_csv(str(path), rows=1200, seed=7)
    return str(path)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One small full pipeline run (smoke profile, dirty CSV, both models trained, evaluated
    and judged, blessed ones pushed), built once per session, even across xdist workers.
    Read-only: tests copy what they change (tests/pipeline_fixtures.py)."""
    return build_or_reuse_smoke_run(session_shared_dir(tmp_path_factory))


# ----------------------------------------------------------------------------- xdist order

# `make test` runs whole modules on three xdist workers (2 cores: a third worker fills the
# time the others wait on servers, clusters and subprocesses; measured 24 min 14 s against
# 27 min 53 s with two). xdist hands modules out by their number of tests; the suite ends
# sooner when the longest modules start first (longest-processing-time first) and the
# modules reading the shared smoke run start after the one that builds it. Ordered by the
# seconds each module took in a 3-worker run (2026-11-30); modules not listed follow in
# xdist's order.
SLOWEST_MODULES_FIRST = (
    "tests/test_cluster.py",          # a local, a Kubeflow and an s3:// pipeline run
    "tests/test_end_to_end.py",       # builds the session's smoke run (trains both models)
    "tests/test_engines.py",          # a Flink, then a Spark cluster; its own small CSV
    "tests/test_object_store.py",
    "tests/test_trainer.py",          # reads the smoke run's CNN
    "tests/test_train_gpu_smoke.py",
    "tests/test_benchmark_training_smoke.py",
    "tests/test_tuner.py",             # a distributed search and a warm-start pair
    "tests/test_soak.py",              # a minute of traffic, by design
    "tests/test_model_importer.py",    # two imports, then evaluate, validate and push
    "tests/test_ferplus_end_to_end.py",  # a CNN-only smoke run with FER+ votes
    "tests/test_ferplus_training.py",  # a transform with votes
    "tests/test_wheel.py",             # builds, installs and runs the smoke pipeline
    "tests/test_metadata_mysql.py",
    "tests/test_serving.py",
    "tests/test_statistics.py",
    "tests/test_infra_validator.py",
    "tests/test_export.py",
    "tests/test_transform.py",
    "tests/test_example_gen.py",
    "tests/test_evaluator.py",
    "tests/test_pages_browser.py",
    "tests/test_bulk_inferrer.py",
    "tests/test_augment.py",
    "tests/test_benchmark_serving_smoke.py",
    "tests/test_validation.py",
    "tests/test_review_app.py",
    "tests/test_monitor.py",
    "tests/test_serving_proxy.py",
    "tests/test_example_gen_images.py",
)


class SlowestModulesFirst(LoadFileScheduling):
    """xdist's per-module scheduling, with the work queue reordered once, before any
    module is handed out, by SLOWEST_MODULES_FIRST."""

    def _assign_work_unit(self, node) -> None:
        if not getattr(self, "_reordered", False):
            rank = {module: i for i, module in enumerate(SLOWEST_MODULES_FIRST)}
            queued = list(self.workqueue.items())
            queued.sort(key=lambda unit: rank.get(unit[0], len(rank)))  # stable for the rest
            self.workqueue = OrderedDict(queued)
            self._reordered = True
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") == "loadfile":
        return SlowestModulesFirst(config, log)
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """The docs_image cases photograph a demo run for the documentation: they belong to
    `make docs-images` (which names the run), not to `make test`, so a plain run deselects
    them instead of reporting them skipped."""
    from tests.browser import DOCS_IMAGES_ENV, DOCS_RUN_ENV

    if os.environ.get(DOCS_RUN_ENV) and os.environ.get(DOCS_IMAGES_ENV):
        return
    docs_images = [item for item in items if item.name.startswith("test_docs_image")]
    if docs_images:
        config.hook.pytest_deselected(items=docs_images)
        items[:] = [item for item in items if item not in docs_images]
