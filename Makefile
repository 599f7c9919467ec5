# Two entry points a newcomer needs (see README):
#   make demo   set up, train the shapes demo end to end (VAE -> scale factor -> diffusion) and sample a grid
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# more flags for scripts/demo.py, e.g. DEMO_ARGS="--diffusion-steps 7500" on a CPU that trains the demo faster
DEMO_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-slow demo clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[test,bench,diffusers]"
	touch $@

test: install
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(PY) scripts/demo.py --out $(DEMO_DIR) $(DEMO_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
