# Two commands on a fresh machine (Python 3.10+ and pip):
#   make run    create .venv, install the pinned packages, build the extension, print the benchmark table
#   make test   the same set-up, then the test suite
# Also: make demo (train a small CNN with each normalisation), make bench (pytest-benchmark suites),
#   make census (SASS instructions per element of every kernel vs the H100 budget; needs nvcc for CUDA).
# PYTHON picks the interpreter that creates the venv; PYTEST_ARGS adds pytest options.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# torch is pinned to the CPU build on CPU machines; pass TORCH_SPEC= to keep a torch already in the venv.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
STAMP := $(VENV)/.uan-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install run demo test bench census gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(BIN)/python
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install $(TRITON_SPEC) ninja pybind11 numpy matplotlib pytest pytest-benchmark scikit-learn mnist1d
	touch $@

$(STAMP): $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

run: install
	$(BIN)/python -m uan_kernels.bench

demo: install
	$(BIN)/python -m uan_kernels.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

census: install
	$(BIN)/python benchmarks/census.py

# On a machine with a CUDA GPU: build with CUDA for it, test, benchmark, sanitize, profile
# (the machine's own python, torch and triton; nothing is installed).
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh
