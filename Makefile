# lorafleet: `make up` runs the embedded platform, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv up test test-all test-model services tools lint bench clean

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

# the built-in base the tests train and serve on, built once (cached by seed and recipe) before
# pytest starts so no single test pays for it
test-model: venv
	$(PY) -c "from pathlib import Path; from lorafleet.platform.modeling.tiny_moe import build_tiny_moe; \
	p = build_tiny_moe(Path('.lorafleet/test-models')); print('tiny-moe ready:', p)"

test: venv services tools test-model
	$(PY) -m pytest -m "not vllm and not gpu" $(PYTEST_ARGS)

test-all: venv services tools test-model
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy platform adapters_store services

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
