# The README's commands. Everything installs into .venv; nothing else is needed but
# Python >= 3.11, make and a C compiler.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/streamstore demo

# The publish and replay tests run again on redis-py's public API (the fast path's fallback).
FALLBACK_TESTS := tests/test_connection.py tests/test_publish.py tests/test_replay.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	STREAMSTORE_FAST_PATH=off $(BIN)/python -m pytest -q $(FALLBACK_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check streamstore tests scripts
	$(BIN)/ruff format --check streamstore tests scripts
	$(BIN)/mypy

reliability: $(STAMP)
	$(BIN)/python scripts/reliability_report.py

bench: $(STAMP)
	$(BIN)/streamstore bench

clean:
	rm -rf $(VENV) build *.egg-info
