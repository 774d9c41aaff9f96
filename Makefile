# Every target sets up what it needs: `make train` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NPROC ?= 2

.PHONY: install train demo test test-slow bench gpu-check lint clean

# torch is pinned to 2.13.0 (a CPU build on disk here). --no-build-isolation: an isolated
# build of csrc/ would download a multi-GB CUDA torch just to compile against it.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The default config on the available hardware: every process joins one sequence-parallel
# group (configs/tiny.yaml has sp: null); CPU + gloo when there is no GPU.
train: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/train.py --config configs/tiny.yaml

demo: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node 4 launch/ring_demo.py

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# The CPU suite (about 19 minutes on 2 idle cores): planner, scaling and simulate write to
# benchmarks/results/; attention_sp, linear_sp and hf_sp only print (tables: benchmarks/results/*.md).
bench: install
	$(PY) benchmarks/attention_sp.py
	$(PY) benchmarks/linear_sp.py
	$(PY) benchmarks/hf_sp.py
	$(PY) benchmarks/planner.py --json benchmarks/results/planner.json
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/simulate.py
	$(PY) benchmarks/simulate.py --validate benchmarks/results/scaling/scaling.json --calibrate-per-world

# On a GPU machine (README, "GPU check"): no venv, no network; the python that has CUDA torch.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info distseq/*.so
