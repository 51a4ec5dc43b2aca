"""PPO actor and critic losses on response-aligned [B, T] arrays.

Gradients flow only through `logprobs` (actor), `values` (critic) and the
logits/entropy passed to `entropy_bonus`; every other input (old log-probs,
advantages, old values, returns, reference log-probs) must be passed detached.

Stats are local masked token means over this call's batch (not divided by a global
normaliser); they are arrays, still attached to the graph in torch, so detach them
before logging.
"""

from __future__ import annotations

from shared._array import Array, as_bool, check_rank, check_same_shape, namespace
from shared.aggregation import aggregate_loss
from shared.kl import kl_penalty
from shared.logprobs import entropy_from_logits
from shared.masked import masked_mean


def check_policy_inputs(logprobs: Array, old_logprobs: Array, advantages: Array,
                        response_mask: Array, *, clip_low: float, clip_high: float | None):
    """The array namespace of a policy loss's inputs, after checking their shapes (all
    ``[B, T]``) and the clip range (``0 < clip_low < 1``, ``clip_high`` None or > 0)."""
    xp = namespace(logprobs, old_logprobs, advantages, response_mask)
    check_rank(logprobs, 2, "logprobs", "[B, T]")
    check_same_shape("logprobs", logprobs, "old_logprobs", old_logprobs)
    check_same_shape("logprobs", logprobs, "advantages", advantages)
    check_same_shape("logprobs", logprobs, "response_mask", response_mask)
    if not 0 < clip_low < 1:
        raise ValueError(f"clip_low must be in (0, 1), got {clip_low!r}")
    if clip_high is not None and not clip_high > 0:
        raise ValueError(f"clip_high must be positive or None, got {clip_high!r}")
    return xp


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    response_mask: Array,
    *,
    clip_low: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
    agg_mode: str = "token-mean",
    normalizer: Array | float | None = None,
    importance_weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate loss: agg(max(-A r, -A clip(r, 1 - eps_lo, 1 + eps_hi))).

    r_t = exp(m_t (logp_t - logp_old_t)), with m the mask: DeepSpeed-Chat multiplies the
    log-ratio by the mask before exp, so masked tokens have r = 1 (exact on valid ones).
    With `log_ratio_clamp` the log-ratio is first clipped to [-c, c] (verl uses 20).
    With `dual_clip` = c > 1, tokens with A < 0 use min(that loss, -c A) (Ye et al. 2020,
    arXiv:1912.09729; verl `compute_policy_loss_vanilla`).

    Args:
      logprobs: [B, T] log pi_theta(y_t | x, y_<t), differentiable.
      old_logprobs: [B, T] the rollout policy's log-probs, detached.
      advantages: [B, T] A_t, detached.
      response_mask: [B, T] float or bool mask.
      clip_low: eps_lo in (0, 1).
      clip_high: eps_hi (None = clip_low, symmetric clipping).
      dual_clip: c > 1, or None.
      log_ratio_clamp: c > 0, or None.
      agg_mode, normalizer: see `aggregate_loss`.
      importance_weights: optional [B, T] detached per-token weights multiplying each
        token's clipped loss, e.g. the rollout-correction weights of
        `shared.rollout_correction.tis_weights` (verl's `rollout_is_weights`); to mask
        tokens out (MIS), pass `response_mask * mis_mask(...)` as the mask instead.

    Returns:
      loss: scalar.
      stats: clip_fraction (share of valid tokens where the clipped term is the max),
        approx_kl (masked mean of k3 = r - 1 - log r, an estimate of
        KL(pi_old || pi_theta)), ratio_mean, ratio_max (over valid tokens), and
        dual_clip_fraction when dual_clip is set.

    Source: Schulman et al. 2017 (arXiv:1707.06347) eq. 7; DeepSpeed-Chat
    `actor_loss_fn`; asymmetric clip as in DAPO / verl (clip_ratio_low/high).
    """
    xp = check_policy_inputs(logprobs, old_logprobs, advantages, response_mask,
                             clip_low=clip_low, clip_high=clip_high)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip!r}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be positive or None, got {log_ratio_clamp!r}")
    clip_high = clip_low if clip_high is None else clip_high

    valid = as_bool(xp, response_mask)
    zeros = xp.zeros_like(logprobs)
    log_ratio = xp.where(valid, logprobs - old_logprobs, zeros)
    if log_ratio_clamp is not None:
        log_ratio = xp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = xp.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * xp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = xp.maximum(loss_unclipped, loss_clipped)
    stats = {}
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip
        negative = advantages < 0
        stats["dual_clip_fraction"] = masked_mean(
            xp.astype(negative & (loss_mat > loss_dual), logprobs.dtype), response_mask
        )
        loss_mat = xp.where(negative, xp.minimum(loss_mat, loss_dual), loss_mat)
    if importance_weights is not None:
        check_same_shape("logprobs", logprobs, "importance_weights", importance_weights)
        loss_mat = loss_mat * importance_weights

    loss = aggregate_loss(loss_mat, response_mask, mode=agg_mode, normalizer=normalizer)
    stats["clip_fraction"] = masked_mean(
        xp.astype(loss_clipped > loss_unclipped, logprobs.dtype), response_mask
    )
    stats["approx_kl"] = masked_mean(ratio - 1.0 - log_ratio, response_mask)
    stats["ratio_mean"] = masked_mean(ratio, response_mask)
    stats["ratio_max"] = xp.max(xp.where(valid, ratio, xp.full_like(ratio, -xp.inf)))
    return loss, stats


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    response_mask: Array,
    *,
    clip_range: float | None = None,
    agg_mode: str = "token-mean",
    normalizer: Array | float | None = None,
    scale: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss: scale * agg(max((v - R)^2, (v_clip - R)^2)).

    v_clip = clip(v, v_old - eps, v_old + eps); without `clip_range` the loss is
    scale * agg((v - R)^2).

    Args:
      values: [B, T] V_theta(x, y_<t), differentiable.
      old_values: [B, T] the rollout critic's values, detached.
      returns: [B, T] R_t from `gae_advantages`, detached.
      response_mask: [B, T] float or bool mask.
      clip_range: eps > 0, or None for no clipping.
      agg_mode, normalizer: see `aggregate_loss`.
      scale: the 1/2 of DeepSpeed-Chat/OpenRLHF/NeMo (times TRL's vf_coef for TRL).

    Returns:
      loss: scalar.
      stats: value_clip_fraction (share of valid tokens where the clipped error is the
        larger), value_mean, return_mean.

    Source: DeepSpeed-Chat `critic_loss_fn`; OpenAI baselines ppo2 (value clipping).
    """
    xp = namespace(values, old_values, returns, response_mask)
    check_rank(values, 2, "values", "[B, T]")
    check_same_shape("values", values, "old_values", old_values)
    check_same_shape("values", values, "returns", returns)
    check_same_shape("values", values, "response_mask", response_mask)
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be positive or None, got {clip_range!r}")
    err = values - returns
    loss_mat = err * err
    if clip_range is not None:
        clipped = xp.clip(values, old_values - clip_range, old_values + clip_range)
        err_clipped = clipped - returns
        loss_clipped = err_clipped * err_clipped
        clip_fraction = masked_mean(
            xp.astype(loss_clipped > loss_mat, values.dtype), response_mask
        )
        loss_mat = xp.maximum(loss_mat, loss_clipped)
    else:
        clip_fraction = xp.zeros_like(values[0, 0])
    loss = scale * aggregate_loss(loss_mat, response_mask, mode=agg_mode, normalizer=normalizer)
    stats = {
        "value_clip_fraction": clip_fraction,
        "value_mean": masked_mean(values, response_mask),
        "return_mean": masked_mean(returns, response_mask),
    }
    return loss, stats


def entropy_bonus(
    logits_or_entropy: Array,
    response_mask: Array,
    *,
    agg_mode: str = "token-mean",
    normalizer: Array | float | None = None,
) -> Array:
    """Aggregated policy entropy agg(H_t); the actor loss subtracts entropy_coef * it.

    Args:
      logits_or_entropy: [B, T, V] logits (entropy computed here) or [B, T] per-token
        entropies (e.g. computed chunk-wise by the backend).
      response_mask: [B, T] float or bool mask.
      agg_mode, normalizer: see `aggregate_loss`.

    Returns:
      A scalar (positive; differentiable through the logits).

    Source: Schulman et al. 2017 eq. 9 (c2 S[pi]); NeMo-Aligner `entropy_bonus`.
    """
    if logits_or_entropy.ndim == 3:
        entropy = entropy_from_logits(logits_or_entropy)
    else:
        check_rank(logits_or_entropy, 2, "logits_or_entropy", "[B, T] or [B, T, V]")
        entropy = logits_or_entropy
    return aggregate_loss(entropy, response_mask, mode=agg_mode, normalizer=normalizer)


def kl_loss(
    logprobs: Array,
    ref_logprobs: Array,
    response_mask: Array,
    *,
    estimator: str = "k3",
    clamp: float | None = None,
    agg_mode: str = "token-mean",
    normalizer: Array | float | None = None,
) -> Array:
    """KL-as-loss term agg(kl_t(pi_theta, pi_ref)); the actor loss adds kl_coef * it.

    Used instead of the KL reward penalty (kl_in="loss"); k3 is the usual estimator
    here because its gradient is well behaved (verl `use_kl_loss`, GRPO).

    Args:
      logprobs: [B, T] log pi_theta, differentiable.
      ref_logprobs: [B, T] reference log-probs, detached.
      response_mask: [B, T] float or bool mask.
      estimator, clamp: see `kl_penalty`.
      agg_mode, normalizer: see `aggregate_loss`.

    Returns:
      A scalar.

    Source: Shao et al. 2024 (DeepSeekMath / GRPO, arXiv:2402.03300) eq. 4; verl
    `kl_penalty` with `use_kl_loss`.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp)
    return aggregate_loss(kl, response_mask, mode=agg_mode, normalizer=normalizer)


def ppo_ptx_objective(ppo_loss: Array, ptx_loss: Array, *, unsup_coef: float) -> Array:
    """PPO-ptx actor objective: ppo_loss + unsup_coef * ptx_loss.

    InstructGPT (Ouyang et al. 2022, eq. 2) mixes the pre-training log-likelihood
    (gamma = unsup_coef) into the RL objective. DeepSpeed-Chat instead takes a separate
    optimiser step on unsup_coef * ptx_loss (`train_unsupervised`); summing the two
    losses before one step is the InstructGPT form.

    Args:
      ppo_loss: scalar actor loss.
      ptx_loss: scalar pre-training (next-token) loss, e.g. `sft_loss`.
      unsup_coef: the mixing coefficient (DeepSpeed-Chat's --unsup_coef, default 27.8).

    Returns:
      A scalar.
    """
    return ppo_loss + unsup_coef * ptx_loss
