# The README's two set-up commands: `make demo` and `make test`. Both build their own .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_MODEL ?= smollm2-135m
DEMO_PROMPT ?= The capital of France is

.PHONY: demo test test-slow lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -e '.[dev]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/vramfit run $(DEMO_MODEL) -p "$(DEMO_PROMPT)" -n 32 --temp 0

# tests marked `slow` (the larger forms of a few real-model and interpreter tests) are deselected
# here and in CI, which runs their small forms; `make test-slow` runs them
test: $(VENV)/.dev
	$(PY) -m ruff check vramfit tests bench
	$(PY) -m pytest -q -rs -m "not slow"

test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.dev
	$(PY) -m ruff check vramfit tests bench
	$(PY) -m ruff format --check vramfit tests bench

bench: $(VENV)/.base
	$(VENV)/bin/vramfit bench $(DEMO_MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
