# Two commands do all set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   install into .venv and run `rlhf pipeline` on configs/demo.yaml
#   make test   install into .venv and run the test suite
#   make bench  install into .venv, run the benchmark and the cost curves, and write their
#               figures into docs/performance.md (~21 min on a 2-core CPU, estimated)
#   make lock   refresh requirements/constraints.txt from a fresh unpinned install
# Override TORCH_SPEC on a GPU cluster, e.g. TORCH_SPEC="torch==2.5.1" with your
# CUDA index in PIP_EXTRA_INDEX_URL. Every install step but torch's is constrained by
# LOCK, which leaves out torch, what only torch needs and what requires torch (see its
# header); `make install LOCK=` installs pyproject.toml's ranges unpinned.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
BACKEND ?= torch
LOCK ?= requirements/constraints.txt
PIP := $(VENV)/bin/python -m pip
PINNED := $(PIP) install --quiet $(if $(LOCK),-c $(LOCK))
STAMP := $(VENV)/.installed

.PHONY: install lock demo test test-all bench bench-peer lint demo-data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(if $(LOCK),$(VENV)/bin/python requirements/lock.py --check $(LOCK))
	$(PINNED) --upgrade pip setuptools wheel
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PINNED) --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PINNED) -e ".[torch,jax,dev]"
	touch $(STAMP)

# Rewrite LOCK from the installs of `make install` without constraints, in a throwaway
# venv (nothing is run in it); then `make test` and commit the lock if it passes.
lock: LOCK_HOW = make lock: $(TORCH_SPEC), then $(DEEPSPEED_SPEC) and -e .[torch,jax,dev] \
	unconstrained, in a fresh venv
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	pip="$$tmp/venv/bin/python -m pip install --quiet"; \
	$$pip --upgrade pip setuptools wheel; \
	$$pip "$(TORCH_SPEC)"; \
	$$pip --no-build-isolation "$(DEEPSPEED_SPEC)"; \
	$$pip -e ".[torch,jax,dev]"; \
	"$$tmp/venv/bin/python" requirements/lock.py --how "$(LOCK_HOW)" > "$$tmp/lock"; \
	mv "$$tmp/lock" "$(or $(LOCK),requirements/constraints.txt)"

demo: install
	$(VENV)/bin/rlhf pipeline --config configs/demo.yaml --backend $(BACKEND)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

# Everything, including the tests marked slow (multi-process runs, full parity).
test-all: install
	$(VENV)/bin/python -m pytest -m ""

# Speed, MFU, PPO phase split and peak memory of both backends (runs/bench/results.{json,md}),
# then PPO cost against model size, batch, answer length and ZeRO stage with `rlhf plan`'s
# estimate (runs/bench/cost_curves.{json,md}); each rewrites its section of
# docs/performance.md. One model cache for both: the tiny and small models are built once.
bench: install
	set -e; mkdir -p runs; models=$$(mktemp -d runs/bench-models.XXXXXX); \
	trap 'rm -rf "$$models"' EXIT; \
	$(VENV)/bin/python -m bench.run --model-cache "$$models"; \
	$(VENV)/bin/python -m bench.cost_curves --write-docs --model-cache "$$models"

# Issue 16 item 4's peer: TRL's PPO iteration against ours, alternately in one process
# (runs/bench/peer_trl.{json,md}); installs the bench-only `peer` extra (trl) first.
bench-peer: install
	$(PINNED) -e ".[peer]"
	$(VENV)/bin/python -m bench.peer_trl

lint: install
	$(VENV)/bin/ruff check .

# Regenerate the committed demo data and tokenizer (deterministic).
demo-data: install
	$(VENV)/bin/python -m shared.data.demo --out configs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
