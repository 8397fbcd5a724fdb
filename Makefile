# specialkit — every target does its own set-up from nothing (creates .venv, installs the kit).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specialkit-installed

.PHONY: demo study test test-fast lint scrub lab bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c "from specialkit import confusion; print(f'UMAP compiled into the numba cache: {confusion.warm_umap_cache():.0f} s')"
	touch $(STAMP)

## The main job on the built-in offline dataset: the whole pipeline and its HTML report.
demo: $(STAMP)
	$(VENV)/bin/specialkit run --config configs/demo.json

## When do specialists pay off? The demo's regime and the harder glyphs_hard, 5 seeds each (the fewest the
## across-seed verdict reads), 2 runs at once (configs/study.json): runs/regimes/study.csv, study.json, report.html.
study: $(STAMP)
	$(VENV)/bin/specialkit study configs/study.json

## Lint, then every test: the notebooks (nbval) and the real-browser widget test included. A Chromium
## for that test comes from PATH, apt (as root) or Playwright; without one: one line saying what to install.
## The tests run in $(TEST_WORKERS) pytest-xdist workers, one torch thread each (conftest.py: a worker takes a
## whole test file, one worker all the notebooks in order); `make test TEST_WORKERS=0` runs them in this one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/ensure_browser.py
	$(PY) -m pytest -n $(TEST_WORKERS)

## The same without the real-browser test (no browser needed).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not browser"

## ruff's checks and its formatter's check (configured in pyproject.toml; `ruff format .` formats).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Strip outputs and execution counts from the notebooks before committing them.
scrub: $(STAMP)
	$(VENV)/bin/nbstripout notebooks/*.ipynb

## JupyterLab on the notebooks.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/combine.py
	$(PY) bench/inference_cost.py
	$(PY) bench/streaming.py

clean:
	rm -rf runs/ .pytest_cache build *.egg-info
