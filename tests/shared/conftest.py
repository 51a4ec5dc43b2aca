"""Fixtures for the `shared` math tests: an `xp` fixture over numpy, torch and jax.numpy
(float64 everywhere) and a `run` helper that calls functions on that backend, under
jax.jit for JAX and, where a test asks, also un-jitted (as scipy's array-API conftest
and chex.all_variants do).
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from array_helpers import Runner

BACKENDS = ["numpy", "torch", "jax"]


def _namespace(name: str):
    if name == "numpy":
        return array_api_compat.array_namespace(np.zeros(1))
    if name == "torch":
        torch = pytest.importorskip("torch")
        return array_api_compat.array_namespace(torch.zeros(1))
    jnp = pytest.importorskip("jax.numpy")
    return jnp


@pytest.fixture
def jax_x64():
    """Enable float64 and rank-promotion errors in JAX for one test, then restore."""
    jax = pytest.importorskip("jax")
    previous = (jax.config.jax_enable_x64, jax.config.jax_numpy_rank_promotion)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    yield
    jax.config.update("jax_enable_x64", previous[0])
    jax.config.update("jax_numpy_rank_promotion", previous[1])


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def xp(request):
    """The array namespace of one backend (array_api_compat's numpy/torch, jax.numpy)."""
    if request.param == "jax":
        request.getfixturevalue("jax_x64")
    return _namespace(request.param)


@pytest.fixture
def run(xp):
    """A `Runner` for the `xp` backend (asarray in float64, call jitted under JAX)."""
    return Runner(xp)
