# vllm-kvbuffer developer commands. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python

# Keep every cache and temp file of vLLM, Triton, torch and HF inside the project.
export KVB_CACHE := $(CURDIR)/.cache
export VLLM_CACHE_ROOT := $(KVB_CACHE)/vllm
export TRITON_CACHE_DIR := $(KVB_CACHE)/triton
export TORCHINDUCTOR_CACHE_DIR := $(KVB_CACHE)/inductor
export NUMBA_CACHE_DIR := $(KVB_CACHE)/numba
export XDG_CACHE_HOME := $(KVB_CACHE)/xdg
export HF_HOME := $(KVB_CACHE)/hf
export HF_HUB_OFFLINE := 1
export TMPDIR := $(KVB_CACHE)/tmp

.PHONY: setup demo lint test test-kernels bench-decode clean

setup:
	@mkdir -p $(TMPDIR)
	@bash scripts/setup_env.sh

demo: setup
	$(PY) examples/generate_tiny.py

# ruff with the rules in pyproject.toml; a `# noqa: CODE` must give its reason after the code.
lint: setup
	$(PY) -m ruff check .
	@if grep -rnE --include='*.py' '# noqa(: *[A-Z]+[0-9]+(, *[A-Z]+[0-9]+)*)? *$$' \
		vllm_kvbuffer tests benchmarks examples scripts; then \
		echo "lint: give the reason after each '# noqa: CODE' above"; exit 1; fi

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-kernels: setup
	$(PY) -m pytest -q tests/kernels $(PYTEST_ARGS)

clean:
	rm -rf $(KVB_CACHE) .pytest_cache
