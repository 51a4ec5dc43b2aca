"""Session fixtures of the fault-injection suite: one tokenised-data cache, one JAX compilation
cache, the tiny pipeline's config and its uninterrupted runs (one per backend, made once and
compared with every killed-and-resumed run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_harness import REPO, SEED, child_env, pipeline_argv, rlhf, write_config


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def data_cache(fault_dir) -> Path:
    return fault_dir / "data-cache"


@pytest.fixture(scope="session")
def jax_cache(fault_dir) -> Path:
    return fault_dir / "jax-cache"


@pytest.fixture(scope="session")
def env(jax_cache) -> dict[str, str]:
    return child_env(jax_cache)


@pytest.fixture(scope="session")
def tiny_config(fault_dir, data_cache) -> Path:
    """The tiny pipeline (``fault_harness.TINY``) with ``seed: SEED``."""
    return write_config(fault_dir / "config", data_cache, {"seed": SEED})


@pytest.fixture(scope="session")
def reference_run(fault_dir, tiny_config, env):
    """``reference_run(backend)``: the run directory of an uninterrupted ``rlhf pipeline`` on
    the tiny config (made on first use)."""
    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in made:
            run_dir = fault_dir / f"reference-{backend}"
            result = rlhf(pipeline_argv(tiny_config, backend, run_dir), env=env, cwd=REPO)
            assert result.returncode == 0, result.stderr[-3000:]
            made[backend] = run_dir
        return made[backend]

    return get
