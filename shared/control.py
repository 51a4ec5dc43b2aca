"""Pure (init, update) state pairs, optax-style: KL-coefficient controllers and an EMA
of model parameters.

State is explicit and immutable: `update` returns a new state and never mutates its
input. States are pytrees (NamedTuples, dicts, lists, tuples) whose leaves are arrays
or Python floats, so a backend may keep them on device (JAX, jit-able) or as plain
floats (torch trainer loop) and get the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from shared._array import namespace


class KLControllerState(NamedTuple):
    """State of a KL controller: the current coefficient beta (float or 0-d array)."""

    kl_coef: Any


class KLController(NamedTuple):
    """A KL controller: `init() -> state`, `update(state, *, current_kl, n_steps) -> state`."""

    init: Callable[[], KLControllerState]
    update: Callable[..., KLControllerState]


def fixed_kl_controller(*, kl_coef: float) -> KLController:
    """A constant KL coefficient: update returns the state unchanged.

    Source: Ziegler et al. 2019 (arXiv:1909.08593) section 2.2, fixed beta;
    DeepSpeed-Chat (kl_ctl = 0.1); TRL / verl `FixedKLController`.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=kl_coef)

    def update(state: KLControllerState, *, current_kl: Any, n_steps: Any) -> KLControllerState:
        del current_kl, n_steps
        return state

    return KLController(init=init, update=update)


def adaptive_kl_controller(*, init_kl_coef: float, target: float, horizon: float) -> KLController:
    """Proportional controller driving the measured KL towards `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)

    `current_kl` is the batch-mean sequence KL (sum over tokens) and `n_steps` the
    number of samples in the batch, as in the paper; both may be Python numbers or
    0-d arrays (the state then becomes an array).

    Source: Ziegler et al. 2019 (arXiv:1909.08593) eq. 3 (K_beta = 0.1 -> clip 0.2);
    verl / OpenRLHF `AdaptiveKLController`.
    """
    if init_kl_coef < 0:
        raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
    if not target > 0:
        raise ValueError(f"target must be positive, got {target!r}")
    if not horizon > 0:
        raise ValueError(f"horizon must be positive, got {horizon!r}")

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=init_kl_coef)

    def update(state: KLControllerState, *, current_kl: Any, n_steps: Any) -> KLControllerState:
        ratio_error = current_kl / target - 1.0
        if isinstance(ratio_error, (int, float)):
            error = min(max(ratio_error, -0.2), 0.2)
        else:
            error = namespace(ratio_error).clip(ratio_error, -0.2, 0.2)
        return KLControllerState(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))

    return KLController(init=init, update=update)


class EmaState(NamedTuple):
    """State of an EMA: a pytree of averaged parameters, shaped like the params."""

    ema: Any


class Ema(NamedTuple):
    """An EMA: `init(params) -> state`, `update(state, params) -> state`."""

    init: Callable[[Any], EmaState]
    update: Callable[[EmaState, Any], EmaState]


def ema(*, beta: float = 0.992) -> Ema:
    """Exponential moving average of parameters: e <- beta * e + (1 - beta) * p.

    `init` starts the average at the parameters themselves (no zero-debiasing).
    Parameters are a pytree of dicts / lists / tuples with array or float leaves.

    Source: DeepSpeed-Chat `moving_average` (dschat/utils/utils.py; --enable_ema,
    beta 0.992), which computes the same average as torch.lerp(p, e, beta).
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")

    def init(params: Any) -> EmaState:
        return EmaState(ema=tree_map(lambda p: p, params))

    def update(state: EmaState, params: Any) -> EmaState:
        return EmaState(ema=tree_map(lambda e, p: beta * e + (1.0 - beta) * p, state.ema, params))

    return Ema(init=init, update=update)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply `fn` leaf-wise over matching dict / list / tuple / NamedTuple structures.

    Framework-free (no jax.tree_util, no torch.utils._pytree); anything that is not a
    dict, list or tuple is a leaf. Raises ValueError when the structures differ.
    """
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or set(other) != set(tree):
                raise ValueError(f"tree structures differ: keys {sorted(tree)} vs {other!r}")
        return {key: tree_map(fn, tree[key], *(o[key] for o in rest)) for key in tree}
    if isinstance(tree, (list, tuple)):
        for other in rest:
            if not isinstance(other, (list, tuple)) or len(other) != len(tree):
                raise ValueError(f"tree structures differ: length {len(tree)} vs {other!r}")
        children = [tree_map(fn, *items) for items in zip(tree, *rest, strict=True)]
        if isinstance(tree, list):
            return children
        if hasattr(tree, "_fields"):  # NamedTuple
            return type(tree)(*children)
        return type(tree)(children)
    return fn(tree, *rest)
