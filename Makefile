# Two commands on a fresh machine:  make demo  (quickstart on a tiny model, offline, CPU)  and  make test.
# Each sets up .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel this project's
# machines carry; on a CUDA machine use e.g.  make test TORCH_SPEC=torch  (or install torch yourself first).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint browser-deps bench screenshots clean

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

# The browser tests (tests/browser) drive Debian's Chromium; install it when it is missing (as root, or with sudo).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "Installing Chromium for the browser tests (apt-get install chromium)..."; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); log=$$(mktemp); \
	  if ! { $$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y \
	         --no-install-recommends chromium; } >"$$log" 2>&1; then \
	    tail -n 40 "$$log" >&2; rm -f "$$log"; \
	    echo "ERROR: apt-get could not install chromium, which the browser tests need (/usr/bin/chromium)." >&2; \
	    exit 1; \
	  fi; \
	  rm -f "$$log"; \
	fi

test: lint browser-deps
	node --test js/tests/
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/plan_latency.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/observer_cost.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/panel_latency.py

# The README's screenshots (docs/*.png), taken by the browser tests that show them.
screenshots: setup browser-deps
	HF_HUB_OFFLINE=1 JUPYTER_LORA_SCREENSHOTS=docs $(PY) -m pytest -q \
	  tests/browser/test_widgets_smoke.py::test_training_progress_widget_and_stop \
	  tests/browser/test_panel_browser.py::test_panel_live_counts_highlight_and_inject \
	  tests/browser/test_panel_layout_browser.py::test_panel_tabs_preview_the_forms_data_and_open_the_chat \
	  tests/browser/test_data_preview_browser.py::test_data_preview_greys_masked_tokens_and_draws_the_histogram \
	  tests/browser/test_chat_browser.py::test_chat_streams_a_reply_and_stop_ends_it

# On a CUDA machine (no .venv needed: torch, transformers, peft, accelerate and bitsandbytes as installed there):
# every GPU figure — throughput (bf16 and QLoRA, checkpointing off/on), memory estimate vs measured, pytest -m gpu —
# as markdown and JSON under OUT.
GPU_PYTHON ?= python3
OUT ?= out/gpu-check
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
