# lorafleet: `make up` runs the embedded platform, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv up test test-all services tools lint bench clean

venv: $(VENV)/.installed

# torch==2.13.0 first: a CPU build that lies on these machines; a plain `torch`
# requirement resolved first would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

up: venv
	$(VENV)/bin/lorafleet up

services:
	bash scripts/services.sh

# promtool (Debian prometheus) and chromium for the deploy and browser tests
tools:
	bash scripts/install-test-tools.sh

test: venv services tools
	$(PY) -m pytest -m "not vllm and not gpu" $(PYTEST_ARGS)

test-all: venv services tools
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy platform adapters_store services

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
