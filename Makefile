# clrx: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision first, pinned to the builds this project is tested with; override to taste.
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run disciplined test mutate ui lint format bench bench-data reproduce compare clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## create .venv and install clrx with its dev tools

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

run: install ## train one-cycle on the digits default (more overrides: make run ARGS="trainer.epochs=20")
	$(PY) -m clrx policy=one_cycle $(ARGS)

disciplined: install ## batch, weight decay, bounds, then one-cycle training, under one MLflow parent (ARGS="trainer.epochs=20 ...")
	$(PY) -m clrx.disciplined $(ARGS)

test: install ## run the test suite, one pytest-xdist worker per core
	$(PY) -m pytest -n auto --dist worksteal

# The pure logic: policies, the range test's curve and rules, the recorder, the trainer checks, the tracker's buffer.
MUTANTS ?= 'clrx.schedules.policies.*' 'clrx.range_test.curve.*' 'clrx.range_test.suggest.*' 'clrx.training.recorder.*' \
	'clrx.config.schema.x_check_trainer*' 'clrx.tracking.store.xǁTrackerǁpoints*' 'clrx.tracking.store.xǁTrackerǁflush*'

mutate: install ## mutation testing of the pure logic against its unit tests (slow; not part of test)
	HYPOTHESIS_PROFILE=mutation $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

ui: install ## open the MLflow UI on ./mlflow.db at http://127.0.0.1:5000
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: install ## time clrx's step against a hand-written loop; writes bench.json (ARGS="model.name=resnet18 ...")
	$(PY) -m clrx.studies.bench $(ARGS)

bench-data: install ## input-pipeline images/s next to the training step rate; writes throughput.json
	$(PY) -m clrx.studies.throughput $(ARGS)

reproduce: install ## the papers' claims at small scale, 3 seeds; writes reproduce/ (ARGS="--seeds 5 ...")
	$(PY) -m clrx.studies.reproduce $(ARGS)

compare: install ## schedules side by side, 3 seeds, verdicts against one-cycle; writes compare/ (ARGS="--seeds 5 ...")
	$(PY) -m clrx.studies.compare $(ARGS)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove run outputs, reports and the local MLflow store (keeps .venv)
	rm -rf outputs multirun mlflow.db mlartifacts bench.json throughput.json reproduce compare reports
