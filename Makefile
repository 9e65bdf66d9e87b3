# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first;
# `make test` also installs the Debian packages the tests need (system-deps), then lints.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
RUN_DIR ?= demo_run
DEMO_ROWS ?= 4000
BEAM_ARGS ?=

.PHONY: setup s3-server demo system-deps lint test test-engines bench docs docs-images clean \
	mysql-up mysql-down \
	engines flink-up flink-down spark-up spark-down

setup: $(STAMP)

# The S3-compatible server the object-store tests run against (tests/object_store.py).
# Its own venv: moto needs a pydantic the pipeline's venv cannot have.
S3_VENV := .venv-s3
S3_STAMP := $(S3_VENV)/.installed
S3_SERVER_PIN := moto[server]==5.2.5

s3-server: $(S3_STAMP)

# Depends on the Makefile so a changed pin reinstalls (a no-op when it is already there).
# The pipeline's venv comes first for its uv (see UV_PIN below).
$(S3_STAMP): Makefile $(STAMP)
	@test -x $(S3_VENV)/bin/python || $(PYTHON) -m venv $(S3_VENV)
	@echo "== setting up $(S3_VENV) ($(S3_SERVER_PIN), the S3 server the object-store tests use)"
	@if [ -x $(BIN)/uv ]; then \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(S3_VENV)/bin/python "$(S3_SERVER_PIN)"; \
	else \
	  $(S3_VENV)/bin/pip install $(PIP_QUIET) "$(S3_SERVER_PIN)"; \
	fi
	@touch $(S3_STAMP)

# setuptools notes that the editable install prints and nobody can act on: [tool.setuptools]
# in pyproject.toml is "beta", and editable_wheel's note about same-named folders.
SETUPTOOLS_NOTES := ignore:Support for `[tool.setuptools]` in `pyproject.toml` is still *beta*:UserWarning:setuptools.config.pyprojecttoml,ignore::UserWarning:setuptools.command.editable_wheel
PIP_QUIET := --quiet --no-warn-script-location --disable-pip-version-check

# uv installs the same exact pins as pip (the same versions, checked) in a fraction of pip's
# time (docs/benchmarks.md, "Set-up"); pip is the fallback when uv cannot be installed.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE
# is set (CI) Python never writes them either, so every process (fer-serve, each Kubeflow
# component, each Beam worker) compiled TensorFlow's sources again: importing TF, Beam and
# TFT took 21 s instead of 10. Compiling once costs about 50 s of set-up.
UV_PIN := uv==0.13.9

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== setting up $(VENV) from requirements.lock (about 1.5 minutes the first time on a fast network: downloads, then compiling the bytecode)"
	@if $(BIN)/pip install $(PIP_QUIET) "$(UV_PIN)" >/dev/null 2>&1; then \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock; \
	else \
	  echo "== uv unavailable: installing with pip (slower)"; \
	  $(BIN)/pip install $(PIP_QUIET) --upgrade pip && \
	  $(BIN)/pip install $(PIP_QUIET) -r requirements.lock; \
	fi
	@PYTHONWARNINGS='$(SETUPTOOLS_NOTES)' $(BIN)/pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	bash tools/demo.sh "$(RUN_DIR)" "$(DATA)" "$(DEMO_ROWS)" $(BEAM_ARGS)

# Three pytest-xdist workers on 2 cores (the third fills the time the others wait on
# servers, clusters and subprocesses: 24 min 14 s against 27 min 53 s with two, same
# machine and day): whole modules go to one worker each, so module fixtures are built
# once; session fixtures that train are shared through a file lock
# (tests/pipeline_fixtures.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3

# The Debian packages the tests need (chromium, mariadb-server, a JDK and Maven for
# `engines`): installed when missing if run as root with apt-get (CI: .ci/run is just
# `make test`), otherwise one line per missing package naming the command that installs it.
# `make demo` needs none of them.
system-deps:
	@bash tools/install_system_deps.sh

# ruff (the [tool.ruff] rules in pyproject.toml) and import-linter (the [tool.importlinter]
# contracts: the layers pipeline > components > serving > core, components independent).
lint: setup
	$(BIN)/ruff check core pipeline components serving tests benchmarks tools
	$(BIN)/lint-imports

# The Flink and Spark tests (marker `engines`, tests/test_engines.py) are part of it: `engines`
# fetches their jars once; the module runs its two local clusters one after the other in
# one worker. `make test-engines` runs only them. Prerequisites run in the order listed:
# system-deps first (engines needs its JDK and Maven), then lint before any test.
test: system-deps setup lint s3-server engines
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

test-engines: system-deps setup s3-server engines
	$(BIN)/python -m pytest -q --durations=30 -m engines tests

# A MariaDB on 127.0.0.1 for trying a shared ML Metadata store (README, "On a cluster"):
# data in $(MYSQL_DIR)/data, user `fer` with the password in $$FER_METADATA_MYSQL_PASSWORD.
# Needs Debian's mariadb-server (tools/install_system_deps.sh, run by `make test`, installs it
# or says how); tests/mariadb.py does it.
MYSQL_DIR ?= .mariadb
MYSQL_PORT ?= 3306

mysql-up: setup
	@$(BIN)/python -m tests.mariadb up $(MYSQL_DIR) --port $(MYSQL_PORT)

mysql-down:
	@$(BIN)/python -m tests.mariadb down $(MYSQL_DIR)

# Real Flink and Spark clusters on 127.0.0.1 (tools/local_cluster.py; README, "On a
# cluster"). `engines` fetches their jars from Maven Central once, at the exact versions in
# tools/engines/*.pom.xml, into .engines/ (about 300 MB, 3-4 minutes the first time); starting a
# cluster downloads nothing. Each *-up starts the engine's daemons, Beam's job server and a
# Python worker pool, and prints the Beam flags that run a step there; *-down stops them.
ENGINES_DIR := .engines
# Maven 3.8 writes ANSI colour resets even in batch mode and when quiet: its output goes to
# .engines/mvn-<engine>.log and is shown, without them, only when it fails.
MVN_ENGINES := mvn -q -B -Dstyle.color=never -Dmaven.repo.local=$(CURDIR)/$(ENGINES_DIR)/m2

engines: $(ENGINES_DIR)/flink/beam-flink-job-server.jar $(ENGINES_DIR)/spark/beam-spark-job-server.jar

# tools/engines/*.java and tools/engines/<engine>/*.java (compiled by `install`) are
# ours: NothingToStage.java and BoundServerFactory.java say why.
$(ENGINES_DIR)/flink/beam-flink-job-server.jar: tools/engines/flink.pom.xml $(wildcard tools/engines/*.java tools/engines/flink/*.java) tools/local_cluster.py $(STAMP)
	$(call fetch_engine,flink)

$(ENGINES_DIR)/spark/beam-spark-job-server.jar: tools/engines/spark.pom.xml $(wildcard tools/engines/*.java tools/engines/spark/*.java) tools/local_cluster.py $(STAMP)
	$(call fetch_engine,spark)

define fetch_engine
	@echo "== fetching the $(1) jars from Maven Central (tools/engines/$(1).pom.xml) into $(ENGINES_DIR)/"
	@mkdir -p $(ENGINES_DIR)
	@$(MVN_ENGINES) -f tools/engines/$(1).pom.xml dependency:build-classpath \
	  -Dmdep.outputFile=$(CURDIR)/$(ENGINES_DIR)/$(1).classpath >$(ENGINES_DIR)/mvn-$(1).log 2>&1 || \
	  { sed 's/\x1b\[[0-9;]*m//g' $(ENGINES_DIR)/mvn-$(1).log; exit 1; }
	@$(BIN)/python -m tools.local_cluster install $(1)
endef

flink-up: engines
	@$(BIN)/python -m tools.local_cluster up flink

flink-down:
	@$(BIN)/python -m tools.local_cluster down flink

spark-up: engines
	@$(BIN)/python -m tools.local_cluster up spark

spark-down:
	@$(BIN)/python -m tools.local_cluster down spark

bench: setup
	$(BIN)/python benchmarks/data_half.py

# The documentation site (mkdocs.yml): docs/ and the reference pages generated from the code
# (tools/docs_hooks.py), built strictly into site/; open site/index.html. A few seconds.
# tests/test_docs.py builds it the same way in `make test` and checks its links.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "== site/index.html"

# The screenshots the docs show (docs/images/), taken by the browser tests from a demo run
# (tests/test_pages_browser.py and tests/test_review_app.py, cases named docs_image); the
# demo runs first when $(RUN_DIR) holds none. Commit the PNGs it changes.
docs-images: setup
	@test -f $(RUN_DIR)/monitoring/demo/monitoring.html || $(MAKE) demo
	FER_DOCS_RUN=$(abspath $(RUN_DIR)) FER_DOCS_IMAGES=$(CURDIR)/docs/images \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -k docs_image \
	  tests/test_pages_browser.py tests/test_review_app.py

clean:
	rm -rf $(RUN_DIR) .pytest_cache $(ENGINES_DIR)/run site
