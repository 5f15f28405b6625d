# The targets CI and the README use. Each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

## Start the worker on embedded defaults: a private Redis and a Maildir outbox under ./var
run: $(STAMP)
	$(BIN)/python examples/generate.py
	exec $(BIN)/mailer worker

## Run the whole test suite (real redis-server and aiosmtpd, started by the fixtures)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check mailer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## The benchmark (see README, "Performance"); N=20000 by default
bench: $(STAMP)
	$(BIN)/python -m bench.run --n $${N:-20000}

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
