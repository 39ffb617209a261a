# `make run` and `make test` work on a fresh machine: each creates .venv, installs torch
# only if it is not importable yet, installs the project with its extras, then runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that pip takes the CPU wheel on disk on the build machines; a GPU machine
# with torch already importable in the venv keeps its own build.
TORCH_SPEC ?= torch==2.13.0
# jax is the `jax` extra (the JAX backend, `coherence run --backend jax`); drop it with EXTRAS=test,plot.
EXTRAS ?= test,plot,jax
SUITE  ?= quick
ARGS   ?=

.PHONY: setup run test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/coherence run --suite $(SUITE) $(ARGS)

test: setup
	$(PY) -m pytest -rs --durations=20

bench: setup
	$(PY) tests/benchmarks/bench_memory_vs_stream.py
	$(PY) tests/benchmarks/bench_gemm_overhead.py
	$(PY) tests/benchmarks/bench_allreduce_vs_plain.py
	$(PY) tests/benchmarks/bench_compare_noise.py
	$(PY) tests/benchmarks/bench_fleet_scale.py

clean:
	rm -rf $(VENV) build *.egg-info tests/benchmarks/_build
