# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck diagrams bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build available here; the library itself does not pin torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvroom demo

test: $(STAMP)
	$(BIN)/ruff check kvroom tests benchmarks examples
	$(BIN)/ruff format --check kvroom tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kvroom tests benchmarks examples && $(BIN)/ruff format --check kvroom tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

diagrams: $(STAMP)
	$(BIN)/kvroom diagrams

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
