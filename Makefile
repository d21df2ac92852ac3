# The interpreter is always .venv/bin/python; every target installs what it needs itself.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# seeds of `make demo`, run as parallel one-thread processes; the report card's verdicts pair them over
# seeds (3 x ~440 CPU-seconds: 13 minutes on an idle 2-core CPU from a fresh clone, install included)
DEMO_SEEDS ?= 3

.PHONY: install test demo bench clean browser

$(PYTHON):
	$(PY) -m venv $(VENV)

$(STAMP): $(PYTHON) pyproject.toml constraints.txt
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# The main job: a trained tiny MoE reasoner, its report card and the command to chat with it.
demo: $(STAMP)
	$(VENV)/bin/nanoseek demo --out runs/demo --seeds $(DEMO_SEEDS)

# Benchmarks side by side with transformers (tables on stdout, JSON under bench/results/).
bench: $(STAMP)
	$(PYTHON) bench/perf.py
	$(PYTHON) bench/load_memory.py

# Debian's chromium + chromedriver for tests/test_web.py. Never fails: without apt-get as root (or
# when apt cannot install them) the browser test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "browser: chromium and chromedriver are installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-liberation >/dev/null) \
		|| echo "browser: apt-get could not install chromium; tests/test_web.py will be skipped"; \
	else \
		echo "browser: no apt-get as root here; install chromium + chromedriver to run tests/test_web.py"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
