# Two commands for a fresh machine:  make demo  (run the appliance)  and  make test  (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-deps bench venv-device venv-all clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv-device: $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'

venv-all: $(BIN)/python
	$(BIN)/pip install -q -e '.[demo,converter,dev]'

demo: venv-device
	$(BIN)/python -m device serve --config config.yaml

# Tests that need a real component (the Mosquitto broker) install it when they can (root, apt) and are
# skipped with the reason when they cannot.
test-deps:
	@command -v mosquitto >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null) ; } || \
	  echo "mosquitto is not installed (apt-get install mosquitto): the MQTT tests will be skipped"

test: venv-all test-deps
	$(BIN)/python -m pytest -q

bench: venv-all
	$(BIN)/python -m bench

clean:
	rm -rf var .pytest_cache
