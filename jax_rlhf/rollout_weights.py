"""The actor in another dtype for rollouts (`ppo.rollout_dtype`): a bf16 sampler on fp32 weights.

A decode step streams every weight matrix once per token; at batch 16 on this CPU that, not
arithmetic, bounds the sampler (docs/performance.md). With `ppo.rollout_dtype: bfloat16` the
sampler runs on a bf16 copy of the actor: half the bytes per step, bf16 matmuls and a bf16 KV
cache. What stays float32, as in vLLM and verl's bf16 rollouts: RMSNorm / LayerNorm statistics
and the attention softmax (the layers compute them in float32 whatever the dtype), and the
sampling step (`jax_rlhf.sampler` upcasts each step's logits before `sample_token` and
`log_softmax`), so a token's recorded log-prob is the float32 log-softmax of bf16-computed
logits. It differs from the training forward's by the bf16 rounding of the network
(`rollout_logprob_gap`), which `ppo.conventions.rollout_correction` tis|mis corrects.

`RolloutWeights.get(state)` casts the actor's current weights once and reuses them until the
training state changes (one cast per PPO iteration, after its training steps, not per step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf.params import ModelDef, Params

__all__ = ["RolloutWeights", "cast_params", "model_def_in_dtype"]


def model_def_in_dtype(mdef: ModelDef, dtype: str) -> ModelDef:
    """`mdef` computing in `dtype`: every submodule's `dtype` / `param_dtype` and the model
    config's (so `init_cache` allocates the KV cache in it) are replaced; same parameter paths.
    """
    dtype = jnp.dtype(dtype)
    abstract = jax.tree_util.tree_unflatten(
        mdef.treedef, [jax.ShapeDtypeStruct((1,), jnp.float32)] * len(mdef.names)
    )
    model = nnx.merge(mdef.graphdef, abstract)
    config = mdef.config.replace(dtype=dtype.name, param_dtype=dtype.name)
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        for name in ("dtype", "param_dtype"):
            if getattr(module, name, None) is not None:
                setattr(module, name, dtype)
        if getattr(module, "config", None) is not None:
            module.config = config
    graphdef, _ = nnx.split(model)
    return dataclasses.replace(mdef, graphdef=graphdef, config=config)


@functools.partial(jax.jit, static_argnames="dtype")
def cast_params(params: Params, dtype: str) -> Params:
    """Floating-point leaves of `params` cast to `dtype` (integer leaves as they are)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


class RolloutWeights:
    """The sampler's `(mdef, params, frozen)`: the actor's own when `dtype` is None or its
    compute dtype, else a cast copy refreshed when the training state object changes.

    Args:
      mdef: the actor's model definition.
      dtype: `ppo.rollout_dtype` (None, "float32" or "bfloat16").
    """

    def __init__(self, mdef: ModelDef, dtype: str | None):
        self.dtype = dtype
        self.cast = dtype is not None and jnp.dtype(dtype) != jnp.dtype(mdef.config.dtype)
        self.mdef = model_def_in_dtype(mdef, dtype) if self.cast else mdef
        self._source = None
        self._weights: tuple[Params, Params] | None = None

    def get(self, state) -> tuple[ModelDef, Params, Params]:
        """For a train state with `.params` / `.frozen`; casts only when `state` is not the
        object last cast (each training step returns a new one)."""
        if not self.cast:
            return self.mdef, state.params, state.frozen
        if self._source is not state:
            self._weights = (cast_params(state.params, self.dtype),
                             cast_params(state.frozen, self.dtype))
            self._source = state
        return (self.mdef, *self._weights)
