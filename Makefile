# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv and installs what it needs on first use.
#
# TORCH_SPEC picks the torch build installed before the project (training needs it):
#   make test                               # the normal torch release from PyPI
#   make test TORCH_SPEC=torch==2.13.0      # a pinned build, e.g. a CPU wheel on local disk
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint audit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml downstream_adapters/pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[train,dev,backup]'
	$(BIN)/python -m pip install --quiet -e './downstream_adapters[torch,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/encoder-service demo

# The whole suite on one Valkey, then the tests of every Redis path that differs on a cluster
# (marked `cluster`) again on a local 3-master Redis Cluster.
test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q --redis-cluster -m cluster

lint: $(STAMP)
	$(BIN)/ruff check encoder_service downstream_adapters tests benchmarks
	$(BIN)/mypy encoder_service

# Known vulnerabilities in the installed dependencies (pip-audit, in its own virtualenv, auditing
# .venv). Fails only when a fixed release exists; see .ci/dependency_audit.py.
AUDIT_VENV ?= .venv-audit
audit: $(STAMP)
	@{ test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && \
	   $(AUDIT_VENV)/bin/python -m pip install --quiet pip-audit; }; } || \
	 { echo "audit: SKIPPED, pip-audit could not be installed (no package index reachable)"; exit 0; }; \
	 PIPAPI_PYTHON_LOCATION=$(BIN)/python $(AUDIT_VENV)/bin/python .ci/dependency_audit.py

bench: $(STAMP)
	$(BIN)/python benchmarks/stage1_bench.py --json benchmarks/results/stage1.json

clean:
	rm -rf $(VENV) $(AUDIT_VENV) .pytest_cache
