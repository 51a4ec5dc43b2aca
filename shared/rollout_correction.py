"""Rollout correction: importance weights and masks for the gap between the rollout engine's
log-probs and the trainer's, and the metrics that measure that gap.

The sampler (vLLM, SGLang, our own decoder with other kernels or precision) records
logp_roll_t = log pi_roll(y_t) for the tokens it drew; the trainer recomputes
logp_old_t = log pi_old(y_t) with its own forward before the update. Their difference
delta_t = logp_old_t - logp_roll_t makes the PPO update off-policy; the fix is to weight
(TIS) or drop (MIS) tokens by the ratio rho = pi_old / pi_roll.

Ratio levels:
  token       rho_t = exp(delta_t)
  sequence    rho_b = exp(sum_t m_t delta_t)               (product of token ratios)
  geometric   rho_b = exp(sum_t m_t delta_t / n_b)         (per-token geometric mean)
A sequence-level ratio is broadcast to every token of its row.

  TIS  w = min(rho, C)                                     (truncated importance sampling)
  MIS  keep = [1 / C <= rho <= C]   (or [C_low <= rho <= C])  (masked importance sampling)

Both inputs are detached, so the weights carry no gradient (the stop-gradient of the
references holds by construction).
"""

from __future__ import annotations

import math

from shared._array import (
    Array,
    as_bool,
    as_float,
    check_choice,
    check_rank,
    check_same_shape,
    namespace,
    safe_divide,
)
from shared.kl import kl_penalty
from shared.masked import masked_mean

RATIO_LEVELS = ("token", "sequence", "geometric")


def _log_ratio(train_logprobs, rollout_logprobs, response_mask, level, log_ratio_clamp):
    xp = namespace(train_logprobs, rollout_logprobs, response_mask)
    check_rank(train_logprobs, 2, "train_logprobs", "[B, T]")
    check_same_shape("train_logprobs", train_logprobs, "rollout_logprobs", rollout_logprobs)
    check_same_shape("train_logprobs", train_logprobs, "response_mask", response_mask)
    check_choice("level", level, RATIO_LEVELS)
    valid = as_bool(xp, response_mask)
    zeros = xp.zeros_like(train_logprobs)
    delta = xp.where(valid, train_logprobs - rollout_logprobs, zeros)
    if level != "token":
        per_row = xp.sum(delta, axis=-1, keepdims=True)  # [B, 1]
        if level == "geometric":
            count = xp.sum(as_float(xp, response_mask, delta.dtype), axis=-1, keepdims=True)
            per_row = safe_divide(xp, per_row, count)
        delta = xp.broadcast_to(per_row, delta.shape)
    if log_ratio_clamp is not None:
        delta = xp.clip(delta, -log_ratio_clamp, log_ratio_clamp)
    return xp, valid, delta


def tis_weights(
    train_logprobs: Array,
    rollout_logprobs: Array,
    response_mask: Array,
    *,
    threshold: float = 2.0,
    level: str = "token",
    log_ratio_clamp: float | None = 20.0,
) -> Array:
    """Truncated importance-sampling weights w = min(rho, C) (module docstring for rho).

    Pass them as `policy_loss(..., importance_weights=w)`; identical log-probs give w = 1
    exactly.

    Args:
      train_logprobs: [B, T] log pi_old(y_t) from the trainer's forward, detached.
      rollout_logprobs: [B, T] log pi_roll(y_t) recorded by the sampler, detached.
      response_mask: [B, T] float or bool mask.
      threshold: C > 0, the truncation (verl's `rollout_is_threshold`, 2.0 by default;
        Yao et al. use C = 2).
      level: "token", "sequence" or "geometric".
      log_ratio_clamp: the log-ratio is clipped to [-c, c] before exp (verl clamps at
        20 against overflow); None for no clamp.

    Returns:
      [B, T] weights in [0, C], 0 where masked.

    Source: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training" (fengyao.notion.site/off-policy-rl); verl
    `rollout_corr_helper.compute_rollout_correction_weights` (rollout_is "token" /
    "sequence", log-ratio clamped to +-20, then min(w, threshold); "geometric" is our
    addition); Ionides 2008 (truncated IS).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    xp, valid, delta = _log_ratio(
        train_logprobs, rollout_logprobs, response_mask, level, log_ratio_clamp
    )
    w = xp.minimum(xp.exp(delta), xp.full_like(delta, threshold))
    return xp.where(valid, w, xp.zeros_like(w))


def mis_mask(
    train_logprobs: Array,
    rollout_logprobs: Array,
    response_mask: Array,
    *,
    threshold: float = 2.0,
    threshold_low: float | None = None,
    level: str = "token",
) -> Array:
    """Masked importance sampling: keep the tokens whose ratio lies in [C_low, C].

    keep_t = [C_low <= rho_t <= C] with C_low = 1 / C unless given; at sequence levels a
    whole row is kept or dropped. Multiply the response mask by it before the policy loss
    (and before `loss_normalizer`, so dropped tokens leave the normaliser too).

    Args:
      train_logprobs, rollout_logprobs, response_mask, level: see `tis_weights`.
      threshold: C > 1.
      threshold_low: C_low in (0, C); default 1 / C.

    Returns:
      [B, T] float mask (dtype of train_logprobs): 1 kept, 0 dropped or padding.

    Source: verl `rollout_corr_helper.compute_rollout_rejection_mask` (rejection outside
    [1 / threshold, threshold] at token, sequence or geometric level; verl's sequence level
    may aggregate differently, ours is the product of token ratios); Yao et al. 2025
    (above), MIS.
    """
    if not threshold > 1:
        raise ValueError(f"threshold must be > 1, got {threshold!r}")
    low = 1.0 / threshold if threshold_low is None else threshold_low
    if not 0 < low < threshold:
        raise ValueError(f"threshold_low must be in (0, threshold), got {threshold_low!r}")
    xp, valid, delta = _log_ratio(train_logprobs, rollout_logprobs, response_mask, level, None)
    keep = valid & (delta >= math.log(low)) & (delta <= math.log(threshold))
    return xp.astype(keep, train_logprobs.dtype)


def rollout_logprob_gap(
    train_logprobs: Array,
    rollout_logprobs: Array,
    response_mask: Array,
    *,
    threshold: float = 0.1,
) -> dict[str, Array]:
    """Gap metrics between trainer and rollout log-probs, side by side, over valid tokens.

    With delta_t = logp_train_t - logp_roll_t:
      max_abs_diff        max_t |delta_t|   (verl's `training/rollout_probs_diff_max` is on
                                             probabilities; this is on log-probs)
      mean_abs_diff       mean_t |delta_t|
      k3_kl               mean_t exp(delta) - delta - 1, Schulman's k3 estimate of
                          KL(pi_roll || pi_train) from the rollout's own samples
      fraction_beyond     share of tokens with |delta_t| > threshold
      rollout_ppl_ratio   exp(mean_t delta_t): the rollout's perplexity over the trainer's
                          on the same tokens (1 when they agree)

    Args:
      train_logprobs: [B, T] trainer log-probs of the sampled tokens.
      rollout_logprobs: [B, T] the sampler's recorded log-probs.
      response_mask: [B, T] float or bool mask.
      threshold: |delta| above which a token counts as diverged.

    Returns:
      Dict of scalars (0 for an all-masked batch).

    Source: the diagnostics of verl `compute_rollout_correction_and_rejection_mask` and
    `training/rollout_probs_diff_*` (each framework defines its own; these are ours, side by
    side); Schulman 2020 (k3); Yao et al. 2025 (above).
    """
    xp, valid, delta = _log_ratio(train_logprobs, rollout_logprobs, response_mask, "token", None)
    abs_delta = xp.abs(delta)
    k3 = kl_penalty(rollout_logprobs, train_logprobs, estimator="k3")
    return {
        "max_abs_diff": xp.max(xp.where(valid, abs_delta, xp.zeros_like(abs_delta))),
        "mean_abs_diff": masked_mean(abs_delta, response_mask),
        "k3_kl": masked_mean(k3, response_mask),
        "fraction_beyond": masked_mean(xp.astype(abs_delta > threshold, delta.dtype),
                                       response_mask),
        "rollout_ppl_ratio": xp.exp(masked_mean(delta, response_mask)),
    }
