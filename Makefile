# Two commands do all set-up on a fresh machine (Python 3.10+):
#   make demo   installs into .venv, then runs KTO on the embedded SmolLM2 + VADER data with a before/after report
#   make test   installs into .venv, then runs the test suite (CI runs it via .ci/run, after make lint)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, from a wheel already on disk where pip has one (pip's find-links, as on this
# project's machines); otherwise from the indexes, and with no NVIDIA GPU (no nvidia-smi) PyTorch's CPU index
# is added, whose 2.13.0+cpu pip prefers to PyPI's multi-GB CUDA build. Another build: TORCH="torch==... --index-url ...".
TORCH ?= torch==2.13.0
CPU_INDEX := $(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu)
# The dev extra includes deepspeed (the tests run ZeRO on two CPU processes); DS_BUILD_OPS=0 builds none of its
# ops, so no compiler is needed.

.PHONY: setup demo test test-slow lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-index --no-deps $(TORCH) 2>/dev/null \
	  || $(BIN)/pip install --quiet --disable-pip-version-check $(CPU_INDEX) $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)  # its dependencies, from the usual indexes
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/prospect demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check prospect tests benchmarks
	$(BIN)/ruff format --check prospect tests
	$(BIN)/mypy
