"""Policy-loss variants beside PPO's token-level clip: GSPO's sequence-level ratio, and the
DAPO / Dr. GRPO settings of the existing `policy_loss` and `aggregate_loss` as named data.

What already exists and is only named here:
  DAPO clip-higher       `policy_loss(clip_low=0.2, clip_high=0.28)`   (DAPO_CLIP_HIGHER)
  DAPO token-level loss  agg_mode "token-mean" with the GLOBAL token count as normaliser
                         (sum over every token of the group/batch / all their tokens)
  Dr. GRPO normaliser    agg_mode "seq-mean-token-sum-norm" with max_length = the
                         generation budget (a constant), plus `grpo_advantages(
                         scale_by_std=False)`
"""

from __future__ import annotations

from types import MappingProxyType

from shared._array import (
    Array,
    as_bool,
    as_float,
    check_same_shape,
    safe_divide,
)
from shared.aggregation import aggregate_loss
from shared.masked import masked_mean
from shared.ppo_losses import check_policy_inputs

DAPO_CLIP_HIGHER = MappingProxyType({"clip_low": 0.2, "clip_high": 0.28})
"""DAPO's decoupled clip (Yu et al. 2025, arXiv:2503.14476, sec. 3.1: eps_low 0.2,
eps_high 0.28); pass as `policy_loss(..., **DAPO_CLIP_HIGHER)`."""

DAPO_LOSS_AGG = "token-mean"
"""DAPO's token-level policy-gradient loss (sec. 3.3): token-mean over the global batch."""

DR_GRPO_LOSS_AGG = "seq-mean-token-sum-norm"
"""Dr. GRPO's constant normaliser (Liu et al. 2025, arXiv:2503.20783, sec. 3.1)."""

GSPO_CLIP = MappingProxyType({"clip_low": 3e-4, "clip_high": 4e-4})
"""GSPO's sequence-ratio clip range (Zheng et al. 2025, arXiv:2507.18071 v2, sec. 5.1)."""


def gspo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    response_mask: Array,
    *,
    clip_low: float,
    clip_high: float | None = None,
    log_ratio_max: float | None = 10.0,
    agg_mode: str = "seq-mean-token-mean",
    normalizer: Array | float | None = None,
    importance_weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GSPO: PPO's clipped surrogate on the sequence-level (length-normalised) ratio.

    s_b = exp((1 / n_b) sum_t m_t (logp_t - logp_old_t))     (geometric mean of token ratios)
    l_bt = max(-A_bt s_b, -A_bt clip(s_b, 1 - eps_lo, 1 + eps_hi)),   loss = agg(l)

    The log of s_b is clipped above at `log_ratio_max` before exp (verl clamps at 10).
    Gradients flow through s_b, i.e. through every token of the row. With advantages
    constant over each answer's tokens (every outcome estimator: GRPO, RLOO, ReMax) and
    "seq-mean-token-mean" aggregation, loss and gradient equal verl's GSPO-token form
    s_bt = sg[s_b] pi(y_t) / sg[pi(y_t)] (its value is s_b and its token-mean gradient
    is s_b mean_t grad log pi(y_t) = grad s_b); with per-token advantages the two differ,
    and this is the paper's sequence-level GSPO (the array API has no stop-gradient).

    Args:
      logprobs: [B, T] log pi_theta(y_t | x, y_<t), differentiable.
      old_logprobs: [B, T] log-probs of the policy that sampled, detached.
      advantages: [B, T] A_bt, detached (usually one value per row).
      response_mask: [B, T] float or bool mask.
      clip_low: eps_lo in (0, 1) (GSPO_CLIP for the paper's 3e-4).
      clip_high: eps_hi, default clip_low.
      log_ratio_max: upper clamp on log s_b, or None.
      agg_mode, normalizer: see `aggregate_loss` (verl uses seq-mean-token-mean).
      importance_weights: optional [B, T] detached weights (e.g. `tis_weights`).

    Returns:
      loss: scalar.
      stats: clip_fraction (share of valid tokens whose clipped term is the max),
        seq_ratio_mean (mean of s_b over non-empty rows), seq_ratio_max.

    Source: Zheng et al. 2025 (GSPO, arXiv:2507.18071) eqs. 5-7; verl
    `compute_policy_loss_gspo` (core_algos.py); TRL `importance_sampling_level="sequence"`.
    """
    xp = check_policy_inputs(logprobs, old_logprobs, advantages, response_mask,
                             clip_low=clip_low, clip_high=clip_high)
    clip_high = clip_low if clip_high is None else clip_high

    valid = as_bool(xp, response_mask)
    zeros = xp.zeros_like(logprobs)
    log_ratio = xp.where(valid, logprobs - old_logprobs, zeros)
    lengths = xp.sum(as_float(xp, response_mask, logprobs.dtype), axis=-1)  # [B]
    seq_log_ratio = safe_divide(xp, xp.sum(log_ratio, axis=-1), lengths)  # [B]
    if log_ratio_max is not None:
        seq_log_ratio = xp.minimum(seq_log_ratio, xp.full_like(seq_log_ratio, log_ratio_max))
    seq_ratio = xp.exp(seq_log_ratio)
    ratio = xp.broadcast_to(seq_ratio[:, None], logprobs.shape)  # [B, T]
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * xp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = xp.maximum(loss_unclipped, loss_clipped)
    if importance_weights is not None:
        check_same_shape("logprobs", logprobs, "importance_weights", importance_weights)
        loss_mat = loss_mat * importance_weights
    loss = aggregate_loss(loss_mat, response_mask, mode=agg_mode, normalizer=normalizer)

    rows = lengths > 0
    stats = {
        "clip_fraction": masked_mean(
            xp.astype(loss_clipped > loss_unclipped, logprobs.dtype), response_mask
        ),
        "seq_ratio_mean": masked_mean(seq_ratio, rows),
        "seq_ratio_max": xp.max(xp.where(rows, seq_ratio, xp.full_like(seq_ratio, -xp.inf))),
    }
    return loss, stats
