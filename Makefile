# `make demo` runs the default job, `make test` the test suite; both create .venv
# first, with the exact versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,joblib,submitit]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vizpipe

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Quick versions of the three benchmarks; see docs/benchmarks.md for the full runs.
bench: $(STAMP)
	$(BIN)/python scripts/bench_landscape.py --quick
	$(BIN)/python scripts/bench_hessian.py
	$(BIN)/python scripts/bench_am.py

clean:
	rm -rf $(VENV) outputs multirun
