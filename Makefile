# Two commands on a fresh machine:  make demo  (quickstart on a tiny model, offline, CPU)  and  make test.
# Each sets up .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel this project's
# machines carry; on a CUDA machine use e.g.  make test TORCH_SPEC=torch  (or install torch yourself first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/plan_latency.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/observer_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
