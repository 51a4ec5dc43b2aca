"""The pure pieces every jitted training step is made of.

A step takes a `TrainState` and a batch whose fields are stacked micro-batches `[A, M, ...]`
(A = gradient_accumulation_steps, M examples each, sharded over `("data", "fsdp")` on axis 1)
and returns the new state and metrics. `accumulate_gradients` sums the loss and gradients of
the A micro-batches in a `lax.scan`; the loss functions divide by the count of the WHOLE batch
(`shared.loss_normalizer` over all micro-batches, and over all devices since the arrays are
global), so the sum is exactly the full-batch loss and splitting never changes the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jax_rlhf import sharding
from jax_rlhf.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes while one model trains."""

    step: jax.Array
    """`[]` int32: optimiser steps taken (what the LR schedule reads)."""
    params: Params
    """Trainable parameters (float32 master weights)."""
    frozen: Params
    """Parameters that do not train (base weights under LoRA `only_optimize`)."""
    opt_state: Any
    """The optax state."""

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


def opt_state_shardings(tx: optax.GradientTransformation, params: Params, mesh: Mesh) -> Any:
    """Shardings of `tx.init(params)`: moments as their parameter, counters replicated."""
    abstract = jax.eval_shape(tx.init, params)
    shardings = sharding.param_shardings(params, mesh)
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def init_train_state(
    params: Params, frozen: Params, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """A step-0 `TrainState` laid out on `mesh` by `sharding.PARAM_RULES`."""
    params = sharding.shard_like(params, sharding.param_shardings(params, mesh))
    frozen = sharding.shard_like(frozen, sharding.param_shardings(frozen, mesh))
    init = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))
    step = sharding.shard_like(np.zeros((), np.int32), sharding.replicated(mesh))
    return TrainState(step=step, params=params, frozen=frozen, opt_state=init(params))


def abstract_train_state(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `state` (what a checkpoint restores into)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]],
    params: Any,
    micro_batches: Any,
) -> tuple[Any, dict]:
    """Summed gradients and summed aux of `loss_fn(params, micro_batch) -> (loss, aux)` over
    the leading axis of `micro_batches`.

    `aux` must be additive over micro-batches (losses already divided by the global count,
    token counts, count-weighted means).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
    if num_micro == 1:
        return grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))

    def body(carry, micro_batch):
        grads, aux = grad_fn(params, micro_batch)
        return jax.tree.map(jnp.add, carry, (grads, aux)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
    (grads, aux), _ = jax.lax.scan(body, zeros, micro_batches)
    return grads, aux


def apply_gradients(
    state: TrainState, grads: Params, tx: optax.GradientTransformation
) -> tuple[TrainState, jax.Array]:
    """One optimiser update; returns the new state and the pre-clip global gradient norm.

    Gradients with a NaN or an infinity (a non-finite norm) are not applied: the state comes
    back unchanged (parameters, optimiser state and step counter, so the schedule does not
    advance either), as DeepSpeed skips an overflowing step; the NaN norm tells the loop's
    non-finite guard (`shared.guard`)."""
    norm = optax.tree.norm(grads)

    def update(state: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    new_state = jax.lax.cond(jnp.isfinite(norm), update, lambda state: state, state)
    return new_state, norm


def stack_micro_batches(batch: Mapping[str, np.ndarray], num_micro: int) -> dict[str, np.ndarray]:
    """`[A * M, ...]` host arrays -> `[A, M, ...]`: micro-batch a is rows a*M ... (a+1)*M - 1."""
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        if x.shape[0] % num_micro:
            raise ValueError(f"{name}: {x.shape[0]} rows do not split into {num_micro} "
                             "micro-batches")
        out[name] = x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])
    return out


def jit_step(
    fn: Callable, mesh: Mesh, state_shardings: Any, *, donate: bool = True,
    static_spec: bool = False,
) -> Callable:
    """`jax.jit(fn)` for `fn(state, batch) -> (state, metrics)`: state in and out with its
    own shardings, batch fields `[A, M, ...]` split over `("data", "fsdp")` on axis 1,
    metrics replicated.

    With `static_spec`, `fn(spec, state, batch)` takes a hashable static first argument;
    steps of the same module-level `fn` and equal specs then share one compilation.
    """
    offset = 1 if static_spec else 0
    return jax.jit(
        fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, axis=1)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(offset,) if donate else (),
        static_argnums=(0,) if static_spec else (),
    )
