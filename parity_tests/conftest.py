"""Session fixtures for the parity tests: tiny HF checkpoints of every family, loaded once into
both backends (the JAX compilations are cached per model structure and batch shape, so the
left- and right-padded variants of a test share one)."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
import torch

from parity_tests.harness import ModelPair, build_checkpoint, load_pair

jax.config.update("jax_numpy_rank_promotion", "raise")
torch.set_num_threads(1)  # tiny models: threads only add overhead on 2 shared cores

SEEDS = {"lm": 0, "value": 1}


@pytest.fixture(autouse=True)
def _float32_jax():
    """Every level runs in float32: switch JAX's x64 mode off for each parity test (another
    test module may have switched it on for the whole process) and restore it after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(family, kind) -> Path` of a saved random HF model (built once)."""
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, kind: str = "lm") -> Path:
        if (family, kind) not in built:
            path = tmp_path_factory.mktemp(f"{family}-{kind}")
            built[family, kind] = build_checkpoint(family, path, kind=kind, seed=SEEDS[kind])
        return built[family, kind]

    return get


@pytest.fixture(scope="session")
def pair(checkpoint):
    """`pair(family, kind) -> ModelPair`: the checkpoint loaded by both backends (once)."""
    loaded: dict[tuple[str, str], ModelPair] = {}

    def get(family: str, kind: str = "lm") -> ModelPair:
        if (family, kind) not in loaded:
            loaded[family, kind] = load_pair(checkpoint(family, kind), kind=kind)
        return loaded[family, kind]

    return get
