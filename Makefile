# Two commands do all set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   install into .venv and run `rlhf pipeline` on configs/demo.yaml
#   make test   install into .venv and run the test suite
#   make bench  install into .venv and run the benchmark (docs/performance.md)
# Override TORCH_SPEC on a GPU cluster, e.g. TORCH_SPEC="torch==2.5.1" with your
# CUDA index in PIP_EXTRA_INDEX_URL.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
BACKEND ?= torch
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench lint demo-data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install --quiet -e ".[torch,jax,dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/rlhf pipeline --config configs/demo.yaml --backend $(BACKEND)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

# Everything, including the tests marked slow (multi-process runs, full parity).
test-all: install
	$(VENV)/bin/python -m pytest -m ""

# Speed, MFU, PPO phase split and peak memory of both backends: runs/bench/results.{json,md}.
bench: install
	$(VENV)/bin/python -m bench.run

lint: install
	$(VENV)/bin/ruff check .

# Regenerate the committed demo data and tokenizer (deterministic).
demo-data: install
	$(VENV)/bin/python -m shared.data.demo --out configs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
