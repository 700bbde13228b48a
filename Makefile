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
export TORCH_EXTENSIONS_DIR := $(KVB_CACHE)/torch_extensions
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

# Two passes over the suite, each on 2 pytest-xdist workers that take whole groups of tests
# (a module, or the tests sharing a server or cluster: tests/conftest.py). First the tests that
# start no engine; then those marked slow (vLLM engines, servers, clusters). One thread per
# process (OMP_NUM_THREADS=1): the work is tiny ops, compiles, the Triton interpreter and
# tiny-model engine steps, which on 2 cores run twice as fast side by side, and two OpenMP teams
# on the same 2 cores would spin-wait on each other (the shared server keeps vLLM's own count).
# Exit status 5 is pytest's "no tests selected" (a PYTEST_ARGS path holding only one kind).
XDIST := -n 2 --dist loadgroup --no-loadscope-reorder
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS) || [ $$? -eq 5 ]
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow $(XDIST) $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-kernels: setup
	$(PY) -m pytest -q tests/kernels $(PYTEST_ARGS)

clean:
	rm -rf $(KVB_CACHE) .pytest_cache
