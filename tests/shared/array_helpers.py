"""Test helpers: build arrays in one backend and run functions eagerly and under jax.jit."""

from __future__ import annotations

import functools

import numpy as np


def to_numpy(tree):
    """Convert arrays (any backend) inside tuples/lists/dicts to numpy."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        children = [to_numpy(v) for v in tree]
        return type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)
    if hasattr(tree, "detach"):
        return tree.detach().cpu().numpy()
    return np.asarray(tree)


def _assert_tree_close(a, b, rtol=1e-12, atol=1e-12):
    a, b = to_numpy(a), to_numpy(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_tree_close(a[key], b[key], rtol, atol)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _assert_tree_close(x, y, rtol, atol)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


class Runner:
    """Build arrays in one backend and call functions on them.

    `call(fn, *arrays, **static)` returns fn's result converted to numpy. For JAX it
    runs jax.jit(partial(fn, **static)); with `eager=True` it also runs fn un-jitted
    and checks both agree (op-by-op JAX compiles every primitive per shape, ~2 s per
    call, so the suite does this for a representative subset only).
    """

    def __init__(self, xp):
        self.xp = xp
        self.is_jax = xp.__name__.startswith("jax")

    def asarray(self, value, dtype=None):
        value = np.asarray(value)
        if dtype is None:
            dtype = {"f": "float64", "b": "bool"}.get(value.dtype.kind, "int64")
        return self.xp.asarray(value, dtype=getattr(self.xp, dtype))

    def call(self, fn, *arrays, eager=False, **static):
        if not self.is_jax:
            return to_numpy(fn(*arrays, **static))
        import jax

        jitted = jax.jit(functools.partial(fn, **static))(*arrays)
        if eager:
            _assert_tree_close(fn(*arrays, **static), jitted)
        return to_numpy(jitted)
