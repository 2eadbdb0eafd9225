# The two commands a newcomer needs (see README.md):
#   make demo   set up .venv, write mini-NSD, run every lesson on the mini path
#   make test   set up .venv, run the whole test suite (lessons included)
# Other targets: make lab (open the course in JupyterLab), make book (the course as a website, from the lessons
# `make demo` executed: _build/book/index.html; docs/book.md), make setup, make clean.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mdlib-installed
# Tests and the mini path never touch a model hub (a call to one would hang here, not fail).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
# Idle OpenMP threads spin briefly, then sleep: fast back-to-back torch operations without taking the cores
# from numpy's BLAS threads (see mdlib/__init__.py).
export GOMP_SPINCOUNT := 10000

# Extra options for `make lab` (the browser tests pass --no-browser, a port and a token).
LAB_ARGS ?=

.PHONY: setup demo test lab book clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,book]"
	@touch $(STAMP)
	@echo "environment ready: $(VENV)"

demo: $(STAMP)
	$(PY) -m mdlib.cli course --preset mini

# Two workers (pytest-xdist): one runs the lessons in order (tests/test_notebooks.py, then the browser tests
# that build the site from them: tests/conftest.py's scheduler), the other the unit tests beside them. Each
# worker computes on TEST_THREADS threads (torch, BLAS and the lessons' kernels): workers x threads = the cores,
# since threads that outnumber the cores wait on each other (benchmarks/README.md, "bench_levers.py").
TEST_WORKERS ?= 2
TEST_THREADS ?= 1

test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS)

# Figures in JupyterLab need matplotlib's inline backend, not the Agg exported above for headless runs.
lab: export MPLBACKEND := module://matplotlib_inline.backend_inline
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

# The executed lessons are `make demo`'s; it runs first when they are missing or older than the lessons' code.
book: $(STAMP)
	@$(PY) book/build.py --check || $(MAKE) demo
	$(PY) book/build.py

clean:
	rm -rf $(VENV) .pytest_cache _build test-artifacts
