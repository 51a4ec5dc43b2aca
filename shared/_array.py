"""Private array helpers shared by the math modules (array-API, framework-free).

Every public function in `shared` looks its namespace up once with `namespace(...)`
and passes `xp` down to these helpers, as scipy's array-API code does.

No stop-gradient: the array API has none, so no function here needs one. Quantities
that must not carry gradients (old log-probs, reference log-probs, old values,
advantages, returns) are passed in already detached by the backend
(`tensor.detach()` in torch, `jax.lax.stop_gradient` or simply a value computed
outside the differentiated function in JAX).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

Array = Any  # a numpy / torch / jax array; the array API has no common static type


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of `arrays` (None and Python scalars are ignored)."""
    return array_api_compat.array_namespace(*arrays)


def check_rank(x: Array, rank: int, name: str, shape: str) -> None:
    """Raise ValueError naming `name` unless `x` has `rank` dimensions (shape e.g. '[B, T]')."""
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank} with shape {shape}, got shape {tuple(x.shape)}"
        )


def check_dtype(xp: Any, x: Array, kind: str, name: str) -> None:
    """Raise ValueError naming `name` unless x's dtype is of `kind` ('integral', ...)."""
    if not xp.isdtype(x.dtype, kind):
        raise ValueError(f"{name} must have dtype kind {kind!r}, got {x.dtype}")


def check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    """Raise ValueError unless `a` and `b` have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: "
            f"{tuple(b.shape)} != {tuple(a.shape)}"
        )


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the argument and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def as_bool(xp: Any, mask: Array) -> Array:
    """A float (0/1) or bool mask as a bool array: nonzero means valid."""
    if mask.dtype == xp.bool:
        return mask
    return mask != 0


def as_float(xp: Any, mask: Array, dtype: Any) -> Array:
    """A float or bool mask as 0/1 values of `dtype`."""
    return xp.astype(as_bool(xp, mask), dtype)


def safe_divide(xp: Any, num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0 (no NaN, gradient-safe)."""
    positive = den > 0
    return xp.where(positive, num / xp.where(positive, den, xp.ones_like(den)), xp.zeros_like(num))


def positions(xp: Any, like: Array, n: int, dtype: Any = None) -> Array:
    """xp.arange(n) on the device of `like` (an integer array unless dtype is given)."""
    t = xp.arange(n, device=array_api_compat.device(like))
    return t if dtype is None else xp.astype(t, dtype)


def scalar(xp: Any, value: float, like: Array) -> Array:
    """A 0-d array holding `value`, with the dtype and device of `like`."""
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))


def index_dtype(xp: Any) -> Any:
    """The namespace's default integer dtype for indices (int64 in torch, int32 in JAX x32)."""
    return xp.__array_namespace_info__().default_dtypes()["indexing"]


def widest_float(xp: Any) -> Any:
    """float64 when the namespace has it (torch, numpy, JAX with x64), else float32."""
    floats = xp.__array_namespace_info__().dtypes(kind="real floating")
    return floats.get("float64", floats.get("float32"))


def logsumexp(xp: Any, x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """log(sum(exp(x))) along `axis`, shifted by the max for stability.

    The shift m = max(x) needs no stop-gradient: its derivative cancels exactly in
    m + log(sum(exp(x - m))). Rows that are all -inf give -inf, not NaN.

    Under torch this is `torch.logsumexp` (the same formula as one fused kernel): autograd
    through the generic expression below also differentiates the max (zero in total, but a
    full pass over a [B, T, V] logits tensor, plus the shifted copy and its exp), which cost
    ~7 % of a 100M-parameter SFT step on CPU (docs/performance.md). JAX fuses the generic
    expression itself. tests/shared/test_logprobs.py checks the two agree.
    """
    if array_api_compat.is_torch_namespace(xp):
        return xp.logsumexp(x, dim=axis, keepdim=keepdims)
    return generic_logsumexp(xp, x, axis=axis, keepdims=keepdims)


def generic_logsumexp(xp: Any, x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """`logsumexp` in array-API operations only: the reference every namespace can run.
    """
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(xp: Any, x: Array, axis: int = -1) -> Array:
    """x - logsumexp(x) along `axis`."""
    return x - logsumexp(xp, x, axis=axis, keepdims=True)


def softplus(xp: Any, x: Array) -> Array:
    """log(1 + exp(x)): x + log1p(exp(-x)) for x > 0, log1p(exp(x)) otherwise (no overflow;
    each branch sees only its own inputs, so no inf reaches a gradient).

    The same values as max(x, 0) + log1p(exp(-|x|)), whose gradient at exactly x = 0 depends
    on the framework's max/abs subgradients: JAX gave 0 there instead of sigmoid(0) = 1/2
    (DPO's first step, where policy = reference, hits x = 0 exactly)."""
    zero = xp.zeros_like(x)
    positive = x > 0
    above = xp.where(positive, x, zero)
    below = xp.where(positive, zero, x)
    return xp.where(positive, above + xp.log1p(xp.exp(-above)), xp.log1p(xp.exp(below)))


def log_sigmoid(xp: Any, x: Array) -> Array:
    """log(sigmoid(x)) = -softplus(-x), stable for large |x|."""
    return -softplus(xp, -x)
