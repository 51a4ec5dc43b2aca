"""Models as (static definition, flat parameter dicts): the form every jitted step works on.

`ModelDef.split(model)` takes an NNX model apart into its `nnx.GraphDef` plus two flat dicts
`{"model.layers.0.attn.q_proj.kernel": array, ...}`: the trainable parameters and the frozen
ones (base weights under LoRA's `only_optimize`). Inside a jitted step `mdef.merge(params,
frozen)` rebuilds the module (`nnx.merge`, as flax's gemma example does), so optax, orbax, the
sharding rules (keyed by path) and `shared.ema` (dict pytrees) all see plain dicts of arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

Params = dict[str, jax.Array]


def _dotted(path: tuple) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    if parts and parts[-1] == "value":  # Variable leaves end in GetAttrKey("value")
        parts.pop()
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: its graph, leaf order and which leaves train.

    Hashable by value, so it is a `jit` static argument and equal structures share compiles.
    """

    graphdef: Any
    """`nnx.GraphDef` of the module."""
    treedef: Any
    """Pytree structure of the module's `nnx.State` (leaves in `names` order)."""
    names: tuple[str, ...]
    """Dotted path of every parameter, in leaf order."""
    trainable: tuple[bool, ...]
    """Per leaf: part of the trainable dict (else of the frozen one)."""
    config: Any
    """The model's `ModelConfig`."""
    kind: str
    """`"causal_lm"` or `"value_head"`."""

    @classmethod
    def split(
        cls, model: nnx.Module, *, trainable: Callable[[str], bool] = lambda name: True
    ) -> tuple[ModelDef, Params, Params]:
        """`(mdef, params, frozen)` of `model`; `trainable(path)` picks the trained leaves."""
        from jax_rlhf.models import ValueHeadModel

        graphdef, state = nnx.split(model)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
        names = tuple(_dotted(path) for path, _ in with_paths)
        if len(set(names)) != len(names):
            raise ValueError("two parameters share a dotted path")
        flags = tuple(bool(trainable(name)) for name in names)
        kind = "value_head" if isinstance(model, ValueHeadModel) else "causal_lm"
        mdef = cls(graphdef, treedef, names, flags, model.config, kind)
        leaves = [leaf for _, leaf in with_paths]
        params = {n: x for n, x, t in zip(names, leaves, flags, strict=True) if t}
        frozen = {n: x for n, x, t in zip(names, leaves, flags, strict=True) if not t}
        return mdef, params, frozen

    def merge(self, params: Params, frozen: Params | None = None) -> nnx.Module:
        """The module with these parameter values (works on tracers inside `jit`)."""
        frozen = frozen or {}
        leaves = [
            params[n] if t else frozen[n] for n, t in zip(self.names, self.trainable, strict=True)
        ]
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))

    def with_trainable(self, trainable: Callable[[str], bool]) -> ModelDef:
        """The same model with another trainable/frozen partition."""
        flags = tuple(bool(trainable(n)) for n in self.names)
        return dataclasses.replace(self, trainable=flags)

    def partition(self, values: Params) -> tuple[Params, Params]:
        """Splits one dict holding every parameter into (trainable, frozen)."""
        params = {n: values[n] for n, t in zip(self.names, self.trainable, strict=True) if t}
        frozen = {n: values[n] for n, t in zip(self.names, self.trainable, strict=True) if not t}
        return params, frozen


def to_host(tree: Any) -> Any:
    """Numpy copies of every leaf (gathered across processes when sharded over hosts)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_shards[0].data)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
