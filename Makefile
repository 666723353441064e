# rectrain: `make train` trains the default job; `make test` runs the tests (those marked gpu are skipped
# where there is no CUDA device), with an MLflow server's environment of their own; `make test-gpu` runs
# only those, on one; `make lint` checks style and types; `make docs` builds the documentation site
# (docs/). All set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TORCHREC_VERSION := 1.8.0
FBGEMM_VERSION := 1.8.0
# The CUDA build of fbgemm where a GPU driver is present, the CPU build elsewhere.
FBGEMM := $(if $(shell command -v nvidia-smi 2>/dev/null),fbgemm-gpu,fbgemm-gpu-cpu)
STAMP := $(VENV)/.setup-$(FBGEMM)
MLFLOW_VERSION := 3.17.2
MLFLOW_SERVER := $(VENV)/mlflow-server/bin/mlflow
# Keeps every later install from replacing the torch installed first.
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: setup train test test-gpu lint docs mlflow-server clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	echo "torch==$(TORCH_VERSION)" > $(CONSTRAINTS)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -c $(CONSTRAINTS) $(FBGEMM)==$(FBGEMM_VERSION)
	$(PIP) install --quiet --no-deps torchrec==$(TORCHREC_VERSION)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev,mlflow,docs]'
	$(PY) -c "import torch, torchrec, fbgemm_gpu; print('torch', torch.__version__, '| torchrec', torchrec.__version__)"
	touch $@

train: setup
	$(PY) -m app.train $(ARGS)

# The suite in TEST_WORKERS pytest-xdist workers; --dist loadgroup keeps the tests that share a test
# module's module- or session-scoped fixture on one worker (tests/conftest.py). Its jobs spend some
# of their time waiting (on gloo, servers), but most of it computing: one worker per core, so that
# a slower or shared CI machine is not oversubscribed. `make test TEST_WORKERS=0` runs it in one
# process. It ends with its 25 slowest tests and the 25 that cost the most CPU (tests/cpu_time.py).
TEST_WORKERS ?= 2

test: setup $(MLFLOW_SERVER)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(ARGS)

# ruff (lint, then formatting) and mypy, as configured in pyproject.toml; .pre-commit-config.yaml runs the same.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The MLflow tracking server the tests start on 127.0.0.1, in an environment of its own: the
# server needs SQLAlchemy 2 and pyarrow < 26, which the training environment does not take.
mlflow-server: $(MLFLOW_SERVER)

$(MLFLOW_SERVER):
	$(PYTHON) -m venv $(VENV)/mlflow-server
	$(VENV)/mlflow-server/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/mlflow-server/bin/python -m pip install --quiet mlflow==$(MLFLOW_VERSION)

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests/gpu $(ARGS)

# The documentation site (docs/, Sphinx + MyST) in docs/_build/html; warnings are errors, so a broken
# link or a page missing from the toctree fails it.
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html

clean-outputs:
	rm -rf outputs multirun
