# Two commands on a fresh clone:  `make up`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
SIMULATE ?= 20
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## Broker + bridge + REST API on embedded defaults, with $(SIMULATE) simulated patients.
up: $(STAMP)
	$(BIN)/firstcare up --simulate $(SIMULATE)

## The whole test suite (needs Mosquitto installed; see README).
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
