# The interpreter is always .venv/bin/python; every target installs what it needs itself.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test clean

$(PYTHON):
	$(PY) -m venv $(VENV)

$(STAMP): $(PYTHON) pyproject.toml constraints.txt
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
