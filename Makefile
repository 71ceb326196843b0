# Two commands on a fresh clone:  `make up`  and  `make test`.
# `up` installs only what the product runs on; `test` adds the test tools (the `dev` extra).
PYTHON ?= python3
VENV ?= .venv
SIMULATE ?= 20
TLS ?=
TEST_WORKERS ?= 4
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: up test venv clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(DEV): pyproject.toml $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

## The virtual environment with the test tools (what `make test` uses).
venv: $(DEV)

## Broker + bridge + REST API on embedded defaults, with $(SIMULATE) simulated patients.
## TLS=1: a development CA in data/certs, mqtts with a certificate per device, HTTPS/WSS, signed readings.
up: $(RUNTIME)
	$(BIN)/firstcare up --simulate $(SIMULATE)$(if $(TLS), --tls)

## Lint, type-check, then the whole test suite (needs the services listed under Prerequisites in
## the README), on $(TEST_WORKERS) pytest-xdist workers, each test file on one worker (its module
## fixtures shared as in a serial run); the tests mostly wait on brokers, servers and timers, so more
## workers than cores pay off. TEST_WORKERS=0: one process. PYTEST_ARGS: anything else for pytest.
## ruff and mypy read their configuration from pyproject.toml.
test: $(DEV)
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis .mypy_cache .ruff_cache
