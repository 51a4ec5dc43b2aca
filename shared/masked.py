"""Masked reductions and whitening over response-aligned arrays.

Masks are float (0/1) or bool arrays of the same shape as the data; nonzero means
valid. Masked entries are selected out with `xp.where`, never multiplied, so
garbage (even inf/NaN) in padding cannot leak into a result.
"""

from __future__ import annotations

from shared._array import Array, as_bool, as_float, check_same_shape, namespace, safe_divide


def masked_sum(x: Array, mask: Array, *, axis: int | None = None) -> Array:
    """Sum of the valid entries: sum_i [mask_i] x_i.

    Args:
      x: any shape, e.g. [B, T].
      mask: same shape as `x`.
      axis: reduce over this axis, or over everything when None.

    Returns:
      A scalar (axis=None) or `x` reduced over `axis`.
    """
    xp = namespace(x, mask)
    check_same_shape("x", x, "mask", mask)
    valid = as_bool(xp, mask)
    return xp.sum(xp.where(valid, x, xp.zeros_like(x)), axis=axis)


def masked_mean(x: Array, mask: Array, *, axis: int | None = None) -> Array:
    """Mean of the valid entries: sum_i [mask_i] x_i / sum_i [mask_i].

    An empty selection gives 0 (not NaN).

    Args:
      x: any shape, e.g. [B, T].
      mask: same shape as `x`.
      axis: reduce over this axis, or over everything when None.

    Returns:
      A scalar (axis=None) or `x` reduced over `axis`.

    Source: TRL / verl / OpenRLHF `masked_mean`.
    """
    xp = namespace(x, mask)
    check_same_shape("x", x, "mask", mask)
    count = xp.sum(as_float(xp, mask, x.dtype), axis=axis)
    return safe_divide(xp, masked_sum(x, mask, axis=axis), count)


def masked_var(x: Array, mask: Array, *, unbiased: bool = True, axis: int | None = None) -> Array:
    """Variance of the valid entries around their masked mean.

    var = sum_i [mask_i] (x_i - mean)^2 / n, times n / (n - 1) when `unbiased`
    (Bessel's correction, n = number of valid entries). With n <= 1 the correction
    is skipped (TRL raises there; an array function cannot), giving 0 for n = 1.

    Args:
      x: any shape, e.g. [B, T].
      mask: same shape as `x`.
      unbiased: apply Bessel's correction (TRL's and verl's default).
      axis: reduce over this axis, or over everything when None.

    Returns:
      A scalar (axis=None) or `x` reduced over `axis`.

    Source: TRL `masked_var` (core.py), verl `verl_F.masked_var`.
    """
    xp = namespace(x, mask)
    check_same_shape("x", x, "mask", mask)
    keep = axis is not None
    mean = masked_mean(x, mask, axis=axis)
    centred = x - (xp.expand_dims(mean, axis=axis) if keep else mean)
    var = masked_mean(centred * centred, mask, axis=axis)
    if not unbiased:
        return var
    n = xp.sum(as_float(xp, mask, x.dtype), axis=axis)
    bessel = safe_divide(xp, n, n - 1.0)
    return xp.where(n > 1.0, var * bessel, var)


def masked_whiten(
    x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> Array:
    """Normalise the valid entries to unit variance (and zero mean when shift_mean).

    y = (x - mean) / sqrt(var + eps), plus `mean` added back when not shift_mean;
    mean and the unbiased var are over all valid entries of the batch. Masked
    entries of the result are 0.

    Args:
      x: [B, T] (any shape works).
      mask: same shape as `x`.
      shift_mean: False keeps the original mean (TRL's reward whitening).
      eps: added to the variance.

    Returns:
      Array of `x`'s shape.

    Source: TRL `masked_whiten` (used by TRL and verl for advantages and rewards).
    """
    xp = namespace(x, mask)
    check_same_shape("x", x, "mask", mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    y = (x - mean) / xp.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return xp.where(as_bool(xp, mask), y, xp.zeros_like(y))
