# Two commands for a fresh machine:  make demo  (run the appliance)  and  make test  (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench venv-device venv-all clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv-device: $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'

venv-all: $(BIN)/python
	$(BIN)/pip install -q -e '.[demo,converter,dev]'

demo: venv-device
	$(BIN)/python -m device serve --config config.yaml

test: venv-all
	$(BIN)/python -m pytest -q

bench: venv-all
	$(BIN)/python -m bench

clean:
	rm -rf var .pytest_cache
