"""Reduce a per-token loss matrix to a scalar, invariant to how the batch is split.

Every mode is a sum over tokens or rows divided by a count. Passing the count of
the WHOLE batch (summed over micro-batches and data-parallel ranks, e.g. by an
all-reduce of `loss_normalizer`) as `normalizer` makes the per-micro-batch losses
add up exactly to the full-batch loss, and so do their gradients. Without it each
call normalises by its own local count (the usual single-batch mean).

Modes (verl `agg_loss`, core_algos.py):
  token-mean               sum_{b,t} m l / N_tokens
  seq-mean-token-mean      sum_b (sum_t m l / n_b) / N_seqs
  seq-mean-token-sum       sum_b (sum_t m l) / N_seqs
  seq-mean-token-sum-norm  sum_b (sum_t m l) / (N_seqs * max_length)   (Dr. GRPO)
with m the mask, n_b the valid tokens of row b, and N_seqs counting only rows with
at least one valid token (so all-padding filler rows change nothing).
"""

from __future__ import annotations

from shared._array import (
    Array,
    as_float,
    check_choice,
    check_rank,
    check_same_shape,
    namespace,
    safe_divide,
    scalar,
    widest_float,
)
from shared.masked import masked_sum

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def loss_normalizer(mask: Array, *, mode: str) -> Array:
    """The local count that `aggregate_loss` divides by; all-reduce (sum) it across
    micro-batches and ranks and pass the total back as `normalizer`.

    Args:
      mask: [B, T] response mask.
      mode: one of AGG_MODES.

    Returns:
      A scalar: valid tokens for token-mean, non-empty rows for the seq modes
      (float, dtype of a float mask or the widest float for a bool mask).
    """
    xp = namespace(mask)
    check_rank(mask, 2, "mask", "[B, T]")
    check_choice("mode", mode, AGG_MODES)
    dtype = mask.dtype if xp.isdtype(mask.dtype, "real floating") else widest_float(xp)
    m = as_float(xp, mask, dtype)
    if mode == "token-mean":
        return xp.sum(m)
    return xp.sum(xp.astype(xp.sum(m, axis=-1) > 0, dtype))


def aggregate_loss(
    loss_mat: Array,
    mask: Array,
    *,
    mode: str,
    normalizer: Array | float | None = None,
    max_length: int | None = None,
) -> Array:
    """Masked reduction of a [B, T] loss matrix to a scalar (see module docstring).

    Args:
      loss_mat: [B, T] per-token losses (response-aligned).
      mask: [B, T] response mask; masked entries never contribute.
      mode: one of AGG_MODES.
      normalizer: the global count (tokens for token-mean, non-empty sequences for
        the seq modes); default: this batch's own `loss_normalizer(mask, mode=mode)`.
      max_length: the constant of seq-mean-token-sum-norm (default T); pass the same
        value for every micro-batch when they are padded to different lengths.

    Returns:
      A scalar loss. A zero normaliser gives 0, not NaN.

    Source: verl `agg_loss` (core_algos.py); global normaliser as in verl's and
    Tunix's split-invariant losses.
    """
    xp = namespace(loss_mat, mask)
    check_rank(loss_mat, 2, "loss_mat", "[B, T]")
    check_same_shape("loss_mat", loss_mat, "mask", mask)
    check_choice("mode", mode, AGG_MODES)
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode=mode)
    if isinstance(normalizer, (int, float)):
        normalizer = scalar(xp, float(normalizer), loss_mat)
    normalizer = xp.astype(normalizer, loss_mat.dtype)

    if mode == "token-mean":
        return safe_divide(xp, masked_sum(loss_mat, mask), normalizer)

    row_sums = masked_sum(loss_mat, mask, axis=-1)  # [B]
    if mode == "seq-mean-token-mean":
        row_counts = xp.sum(as_float(xp, mask, loss_mat.dtype), axis=-1)
        row_sums = safe_divide(xp, row_sums, row_counts)
    total = xp.sum(row_sums)
    if mode == "seq-mean-token-sum-norm":
        total = total / float(loss_mat.shape[-1] if max_length is None else max_length)
    return safe_divide(xp, total, normalizer)

