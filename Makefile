# Two entry points for a fresh Linux machine with Python 3.11 and make:
#   make run   - create .venv, install, run the pipeline (dvc repro)
#   make test  - create .venv if needed, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands run `python`: the venv's bin comes first so they get its interpreter.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install run test bench fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: install
	dvc repro

test: install
	$(BIN)/python -m pytest -q

# The fast recipe: a narrow batch-normalised ResNet-9, one-cycle schedule, label smoothing,
# flip + shift test-time augmentation; 13 epochs fit in 10 minutes on 2 CPU cores (README).
FAST_RECIPE := -S model.arch=resnet_fast -S model.width=32 -S train.batch_size=256 \
	-S train.lr=0.2 -S train.epochs=13 -S train.label_smoothing=0.2 \
	-S evaluate.tta_flip=true -S evaluate.tta_shift=1

fast: install
	dvc exp run $(FAST_RECIPE)

bench: install
	$(BIN)/python -m imgclf.bench

clean:
	rm -rf $(VENV) .pytest_cache
