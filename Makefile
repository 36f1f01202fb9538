# Everyday commands. A fresh clone can run `make test` directly: the venv is built on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
PG15_DSN ?= postgresql://postgres@127.0.0.1:5432/postgres
MEOWMX_PG_PORT ?= 5432
COMPOSE_DSN ?= postgresql://postgres@127.0.0.1:$(MEOWMX_PG_PORT)/postgres
PY_DIRS := python tests examples benchmarks

.PHONY: setup test lint fmt demo bench bench-smoke bench-instructions test-pg15 install-extension compose-up compose-test clean

setup: $(STAMP)

# Re-install when pyproject.toml changes (new dependencies, entry points).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/sqlfluff lint sql
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/sqlfluff fix sql
	$(BIN)/ruff check --fix $(PY_DIRS)
	$(BIN)/ruff format $(PY_DIRS)

demo: $(STAMP)
	$(BIN)/meowmx demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# Server instructions per call (callgrind): this schema beside BASE (default 3).
BASE ?= 3
bench-instructions: $(STAMP)
	$(BIN)/python benchmarks/instructions.py --base $(BASE)

# Every workload, tiny: CI checks that the benchmark runs, not its timings.
bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/bench.py --smoke
	$(BIN)/python benchmarks/instructions.py --smoke

# The suite against the machine's PostgreSQL 15 (fixtures make their own databases there).
test-pg15: $(STAMP)
	MEOWMX_TEST_DSN='$(PG15_DSN)' $(BIN)/pytest $(PYTEST_ARGS)

# CREATE EXTENSION meowmx for servers whose files you can write (not managed hosts:
# there, `meowmx install` or the printed SQL is the way). PG_CONFIG picks the server.
PG_CONFIG ?= pg_config
install-extension: $(STAMP)
	$(BIN)/python -c 'import sys, pathlib; from meowmx.install import write_extension as w; w(pathlib.Path(sys.argv[1]))' \
		"$$($(PG_CONFIG) --sharedir)/extension"

compose-up:
	MEOWMX_PG_PORT=$(MEOWMX_PG_PORT) docker compose up -d --wait

compose-test: compose-up $(STAMP)
	MEOWMX_TEST_DSN='$(COMPOSE_DSN)' $(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
