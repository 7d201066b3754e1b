# Entry points for a fresh Linux machine with Python 3.11 and make:
#   make run   - create .venv, install, run the pipeline (dvc repro); offline: the demo instead
#   make demo  - the whole pipeline on the committed 2,500-image CIFAR-10 sample, as experiment `demo`
#   make test  - create .venv if needed, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stage commands run `python`: the venv's bin comes first so they get its interpreter.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install run demo test bench fast speedrun muonrun search show clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Where download.url (the official address) answers, train on the full data; where it does
# not, say so and run the demo (tools/choose_run.py decides, before DVC runs, so each set of
# params still gives one result).
run: install
	@$(BIN)/python tools/choose_run.py --sample $(SAMPLE) $(if $(SAMPLE_SOURCE),--sample-source "$(SAMPLE_SOURCE)"); status=$$?; \
	if [ $$status = 0 ]; then dvc repro; \
	elif [ $$status = 3 ]; then $(MAKE) --no-print-directory demo; \
	else exit $$status; fi

# The demo (recipes/demo.yaml): the sample of real CIFAR-10 images the project commits
# (data/sample/cifar10-sample: 200 train and 50 test images per class, drawn by
# tools/make_sample.py; its PROVENANCE says how), trained with the speed recipe's network at
# width 16 (docs/demo.md). It runs in a temporary copy (--temp), so the workspace and
# params.yaml stay as they are; `dvc exp apply demo` brings its outputs here.
# SAMPLE_SOURCE=/path/to/cifar10-jpeg.tar.gz remakes the sample from that archive where it is missing.
SAMPLE_SOURCE ?=
SAMPLE := data/sample/cifar10-sample
DEMO_MODEL := data/sample/demo-model_state.pt
# The recipes (recipes/*.yaml) as -S arguments; R=... adds or overrides values, e.g. R='-S train.seed=1'.
RECIPE = $(BIN)/python -m imgclf.recipes

demo: install $(SAMPLE)/PROVENANCE
	@dvc exp remove demo >/dev/null 2>&1 || true
	args=$$($(RECIPE) demo) && dvc exp run --temp -n demo $$args
	@dvc exp show --no-pager --md --drop '.*' --keep 'Experiment|test_acc|train_seconds|train_pflop|model.arch|train.epochs'
	@dvc get . models/model_state.pt --rev demo -o $(DEMO_MODEL) --force
	@find $(SAMPLE)/test -type f | sort | awk -F/ '!seen[$$(NF-1)]++' | head -4 | xargs $(BIN)/imgclf-predict --model $(DEMO_MODEL)
	@echo "The demo trained on 2,000 images; on all 50,000 the default recipe reaches about 80% and make speedrun about 90% (README, Results)."
	@echo "Its outputs are in experiment 'demo': dvc exp apply demo brings them into the workspace (with . .venv/bin/activate first)."
	@echo "For the full CIFAR-10: make run where its official address answers, or with a copy of cifar-10-python.tar.gz: dvc exp run -S download.url=/path/to/cifar-10-python.tar.gz"

$(SAMPLE)/PROVENANCE:
	@test -n "$(SAMPLE_SOURCE)" -a -f "$(SAMPLE_SOURCE)" || { echo "make demo: the sample the project commits is missing at $(SAMPLE): git checkout -- $(SAMPLE) brings it back, or make demo SAMPLE_SOURCE=/path/to/cifar10-jpeg.tar.gz remakes it from that archive"; exit 2; }
	$(BIN)/python tools/make_sample.py $(SAMPLE_SOURCE) $(SAMPLE)

test: install
	$(BIN)/python -m pytest -q -n auto --dist loadscope

# The fast, speed and Muon recipes (recipes/fast.yaml, speed.yaml, muon.yaml; docs/recipes.md), each one
# experiment in a temporary copy (--temp): params.yaml stays as it is, and `dvc exp apply <name>`
# brings a run's outputs and params into the workspace. VAL=0.1 holds out 10% of the training
# images and reports on them (choosing); the default VAL=0 trains on all of them and evaluate
# reports the test set once (the final run).
VAL ?= 0
fast: install
	args=$$($(RECIPE) fast -S train.val_fraction=$(VAL)) && dvc exp run --temp $$args $(R)

speedrun: install
	args=$$($(RECIPE) speed -S train.val_fraction=$(VAL)) && dvc exp run --temp $$args $(R)

muonrun: install
	args=$$($(RECIPE) muon -S train.val_fraction=$(VAL)) && dvc exp run --temp $$args $(R)

# The experiments as a table for a terminal (dvc exp show has a column per metric, param and
# dependency: over 130): test and val accuracy, training compute and seconds first, then the
# params that differ between the rows. --drop removes dependencies (a path), metrics of one file
# among several (file:name), per-class accuracies, download.md5 (a hash) and every other plain
# metric (no dot); --keep protects the named columns; params (section.key) stay when they
# differ. A=... adds options: make show A='--sort-by test_acc', A=--csv, A=--md.
SHOW_DROP := '.*/|.*:|per_class_acc\.|download\.md5$$|[^.]*$$'
SHOW_KEEP := 'Experiment$$|test_acc$$|(metrics/train\.json:)?val_acc$$|train_pflop$$|train_seconds$$'
show: install
	@dvc exp show --no-pager --only-changed --drop $(SHOW_DROP) --keep $(SHOW_KEEP) $(A)

# Hyperparameter search (docs/search.md): search.yaml's Optuna study, one `dvc exp run` per
# trial; ARGS passes options, e.g. make search ARGS='--storage postgresql://... --seed 3'.
search: install
	imgclf-search $(ARGS)

bench: install
	$(BIN)/python -m imgclf.bench

clean:
	rm -rf $(VENV) .pytest_cache
