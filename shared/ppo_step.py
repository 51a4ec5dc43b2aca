"""The PPO pipeline driven by a `PPOConventions`: 'experience -> advantages' and
'new forward pass -> actor and critic losses', so both backends call two functions.
"""

from __future__ import annotations

from shared._array import Array, namespace
from shared.advantages import gae_advantages
from shared.control import KLController, adaptive_kl_controller, fixed_kl_controller
from shared.masked import masked_mean, masked_whiten
from shared.policy_variants import gspo_policy_loss
from shared.ppo_losses import entropy_bonus, kl_loss, policy_loss, value_loss
from shared.presets import PPOConventions
from shared.rewards import episode_mask, shape_rewards


def make_kl_controller(conventions: PPOConventions) -> KLController:
    """The KL controller the conventions ask for (kl_controller, kl_coef, kl_target,
    kl_horizon); its state's kl_coef is what `compute_advantages` takes."""
    c = conventions
    if c.kl_controller == "adaptive":
        return adaptive_kl_controller(
            init_kl_coef=c.kl_coef, target=c.kl_target, horizon=c.kl_horizon
        )
    return fixed_kl_controller(kl_coef=c.kl_coef)


def compute_advantages(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    values: Array,
    response_mask: Array,
    *,
    conventions: PPOConventions,
    kl_coef: Array | float | None = None,
) -> dict[str, Array]:
    """Token rewards, KL, GAE advantages and returns for one rollout batch.

    Steps: `shape_rewards` (KL penalty unless kl_in="loss", clipped score at the score
    position) -> optional reward whitening (no mean shift) -> `gae_advantages` ->
    optional advantage whitening over the response mask.

    With gae_mask_mode="zero_after_end" the GAE runs over `episode_mask` (every slot up
    to the score position), which is DeepSpeed-Chat's and TRL's 'zero after the end'
    and, for reward_position="last_token", the response mask itself.

    Args:
      scores: [B] reward-model scores.
      logprobs: [B, T] rollout-policy log-probs of the response tokens.
      ref_logprobs: [B, T] reference-policy log-probs.
      values: [B, T] rollout critic values V(x, y_<t).
      response_mask: [B, T] float or bool mask (prefix of ones).
      conventions: a `PPOConventions` (e.g. `get_preset("deepspeed_chat")`).
      kl_coef: the current KL coefficient (e.g. an adaptive controller's state);
        default conventions.kl_coef.

    Returns:
      dict with token_rewards, kl (the per-token KL estimate used, before kl_coef),
      advantages, returns (all [B, T]; advantages and returns are 0 outside the GAE
      mask). All inputs must be detached; so are the outputs then.
    """
    c = conventions
    beta = c.kl_coef if kl_coef is None else kl_coef
    token_rewards, kl = shape_rewards(
        scores,
        logprobs,
        ref_logprobs,
        response_mask,
        kl_coef=0.0 if c.kl_in == "loss" else beta,
        kl_estimator=c.kl_estimator,
        kl_clamp=c.kl_clamp,
        reward_clip=c.reward_clip,
        position=c.reward_position,
        zero_after_end=c.zero_after_end,
    )
    if c.gae_mask_mode == "zero_after_end":
        gae_mask = episode_mask(response_mask, position=c.reward_position)
    else:
        gae_mask = response_mask
    if c.whiten_rewards:
        token_rewards = masked_whiten(token_rewards, gae_mask, shift_mean=False)
    advantages, returns = gae_advantages(
        token_rewards, values, gae_mask, gamma=c.gamma, lam=c.lam, mask_mode=c.gae_mask_mode
    )
    if c.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    return {"token_rewards": token_rewards, "kl": kl, "advantages": advantages, "returns": returns}


def ppo_losses(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    values: Array,
    old_values: Array,
    returns: Array,
    response_mask: Array,
    *,
    conventions: PPOConventions,
    entropy: Array | None = None,
    ref_logprobs: Array | None = None,
    kl_coef: Array | float | None = None,
    normalizer: Array | float | None = None,
    importance_weights: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Actor and critic losses of one (micro-)batch under `conventions`.

    actor = policy_loss - entropy_coef * entropy_bonus [+ kl_coef * kl_loss if kl_in="loss"]
    critic = value_loss (value_clip, value_loss_scale); 0 without a critic (`values` None)

    The policy loss is `policy_loss` or, with conventions.policy_loss "gspo",
    `gspo_policy_loss` (whose stats gain PPO's token approx_kl).

    Args:
      logprobs: [B, T] current policy log-probs (differentiable).
      old_logprobs, advantages: [B, T] from the rollout, detached.
      values: [B, T] current critic values (differentiable); None for a critic-free run
        (critic_loss and value_clip_fraction are then 0).
      old_values, returns: [B, T] from the rollout, detached.
      response_mask: [B, T] float or bool mask.
      conventions: a `PPOConventions`.
      entropy: [B, T] per-token entropies (or [B, T, V] logits); required when
        entropy_coef != 0.
      ref_logprobs: [B, T] reference log-probs, detached; required when kl_in="loss".
      kl_coef: the current KL coefficient; default conventions.kl_coef.
      normalizer: the global count for `aggregate_loss` (see `loss_normalizer`).
      importance_weights: [B, T] detached per-token weights of the policy loss (TIS,
        `shared.critic_free.rollout_correction`); None: none.

    Returns:
      actor_loss, critic_loss (scalars) and stats: the policy and value stats plus
      pg_loss, entropy and kl_loss when used.
    """
    c = conventions
    agg = {"agg_mode": c.loss_agg_mode, "normalizer": normalizer}
    if c.policy_loss == "gspo":
        actor, stats = gspo_policy_loss(
            logprobs, old_logprobs, advantages, response_mask, clip_low=c.clip_low,
            clip_high=c.clip_high, importance_weights=importance_weights, **agg,
        )
        log_ratio = logprobs - old_logprobs
        stats["approx_kl"] = masked_mean(
            namespace(log_ratio).exp(log_ratio) - 1.0 - log_ratio, response_mask)
    else:
        actor, stats = policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            response_mask,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            dual_clip=c.dual_clip,
            log_ratio_clamp=c.log_ratio_clamp,
            importance_weights=importance_weights,
            **agg,
        )
    stats["pg_loss"] = actor
    if c.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy is required when conventions.entropy_coef != 0")
        stats["entropy"] = entropy_bonus(entropy, response_mask, **agg)
        actor = actor - c.entropy_coef * stats["entropy"]
    if c.kl_in == "loss":
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when conventions.kl_in == 'loss'")
        beta = c.kl_coef if kl_coef is None else kl_coef
        stats["kl_loss"] = kl_loss(
            logprobs, ref_logprobs, response_mask,
            estimator=c.kl_estimator, clamp=c.kl_clamp, **agg,
        )
        actor = actor + beta * stats["kl_loss"]
    if values is None:
        zero = namespace(actor).zeros_like(actor)
        stats["value_clip_fraction"] = zero
        return actor, zero, stats
    critic, value_stats = critic_loss(values, old_values, returns, response_mask,
                                      conventions=c, normalizer=normalizer)
    stats.update(value_stats)
    return actor, critic, stats


def critic_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    response_mask: Array,
    *,
    conventions: PPOConventions,
    normalizer: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The critic half of `ppo_losses` (value_clip, value_loss_scale, loss_agg_mode): what a
    served critic (`rlhf serve critic`) trains on, so it cannot drift from the in-process
    critic. Returns the loss and value_loss's stats (value_clip_fraction, ...)."""
    c = conventions
    return value_loss(values, old_values, returns, response_mask, clip_range=c.value_clip,
                      scale=c.value_loss_scale, agg_mode=c.loss_agg_mode,
                      normalizer=normalizer)

