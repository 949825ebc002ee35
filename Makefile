# The two fresh-machine commands: `make demo` (train on the embedded synthetic set) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synthetic
STAMP := $(VENV)/.installed

.PHONY: demo test lint ui clean gpu-check

$(STAMP): setup.cfg pyproject.toml ci/requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r ci/requirements-cpu.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python datasets/synthetic.py $(DATA)/images --train 400 --test 32 --size 72
	$(BIN)/python -m pipeline.shards $(DATA)/images $(DATA)/shards --maxcount 200 --overwrite
	$(BIN)/python -m pipeline.train --config configs/quickstart.yaml $(ARGS)
	@echo "Run directory: runs/quickstart (samples/, ckpt-*/, metrics.jsonl). MLflow UI: make ui"

# Two pytest workers: much of the suite waits on process start-up, servers and Slurm, so two overlap well on
# two cores. Whole files per worker (loadfile): the Slurm tests share one cluster (two would hand out the same
# job ids, so their jobs' rendezvous ports collide) and the MLflow review tests one server.
PYTEST_ARGS ?= -n 2 --dist loadfile

LINTED := pipeline launch datasets tests benchmarks

# Lint first (ruff, then the import layering in setup.cfg's [importlinter]): seconds, and a lint error fails the
# test command as a failing test would.
test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/lint-imports
	bash ci/install-system-deps.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/lint-imports

# The GPU check (benchmarks/gpu_check.py; README, "GPU"): with a Python whose torch has CUDA (GPU_PY), not the CPU
# venv that `make test` builds. Without CUDA it runs its CPU part and lists what it skipped.
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs data mlflow.db mlartifacts
