# mimi: `make demo` runs MiMi end to end on the built-in default; `make test` runs lint and the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= data/minivtab
RUN ?= runs/demo

.PHONY: venv install test lint test-browser demo minivtab fashion-mnist clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned first: on the project's machines pip takes them from local disk.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,offline,peft,serve,int8,hf]"
	touch $@

venv install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	# the layering of pyproject.toml's [tool.importlinter] contracts: a broken contract fails `make test`
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# The page `mimi serve` serves, in a headless Chromium driven by ChromeDriver (Debian packages; skipped without them).
test-browser: install
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -q tests/test_browser.py

# Fashion-MNIST for the MiniVTAB tasks built from it (Debian package; torchvision can download it elsewhere).
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

minivtab: install fashion-mnist
	$(VENV)/bin/mimi data minivtab --root $(DATA)

demo: install
	$(VENV)/bin/mimi demo --data-root $(DATA) --out $(RUN)

clean:
	rm -rf $(VENV) runs build *.egg-info
