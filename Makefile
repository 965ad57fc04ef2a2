# mimi: `make demo` runs MiMi end to end on the built-in default; `make test` runs lint and the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= data/minivtab
RUN ?= runs/demo

.PHONY: venv install test lint test-browser demo minivtab fashion-mnist clean docs docs-serve

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned first: on the project's machines pip takes them from local disk.
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev,offline,peft,serve,int8,hf,docs]"
	touch $@

venv install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	# the layering of pyproject.toml's [tool.importlinter] contracts: a broken contract fails `make test`
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# The docs site (MkDocs + Material + mkdocstrings), strict: a broken link, a missing page or an API name that no
# longer exists fails the build (tests/test_docs.py builds it too, so `make test` and CI do).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

# The page `mimi serve` serves, and the docs site, in a headless Chromium driven by ChromeDriver (Debian packages;
# skipped without them).
test-browser: install
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -q tests/test_browser.py tests/test_docs_browser.py   # screenshots of the docs site: site/screenshot-*.png

# Fashion-MNIST for the MiniVTAB tasks built from it (Debian package; torchvision can download it elsewhere).
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

minivtab: install fashion-mnist
	$(VENV)/bin/mimi data minivtab --root $(DATA)

demo: install
	$(VENV)/bin/mimi demo --data-root $(DATA) --out $(RUN)

clean:
	rm -rf $(VENV) runs build *.egg-info
