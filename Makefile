# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install the project first; both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.umcd-installed

.PHONY: setup demo test services bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/umcd demo

services:
	bash deploy/install-services.sh

test: setup services
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/umcd bench

clean:
	rm -rf artifacts .pytest_cache
