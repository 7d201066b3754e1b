# Two entry points for a fresh Linux machine with Python 3.11 and make:
#   make run   - create .venv, install, run the pipeline (dvc repro)
#   make test  - create .venv if needed, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands run `python`: the venv's bin comes first so they get its interpreter.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: install
	dvc repro

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m imgclf.bench

clean:
	rm -rf $(VENV) .pytest_cache
