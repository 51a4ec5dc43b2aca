"""The critic-free parts of the one PPO loop (``shared.ppo_loop``): which models a run
builds, the group layout of a generation batch, the outcome advantage estimators and the
rollout correction. Every decision is here, so the two backends only follow it.

- ``models_used(config)``: ``actor`` and ``reference`` always; ``critic`` with
  ``conventions.advantage_estimator: gae``; ``reward_model`` unless
  ``ppo.reward_model_weight`` is 0; ``reward_fn`` with ``ppo.reward_function``; a served
  role as ``reference@<url>`` / ``reward_model@<url>`` / ``critic@<url>``
  (docs/serving.md). A backend builds, steps, checkpoints and exports no critic and loads
  no reward model that is not listed (``PPOLoop.models``; the ``ppo`` entry of
  ``summary.json`` records them).
- ``group_prompts``: a generation batch's prompts each repeated ``n_samples_per_prompt``
  times, rows ``i*n .. i*n + n - 1`` answering prompt ``i`` (``shared.group_advantages``'
  layout). Every row has its own row of ``sampling_uniforms``, so the n answers to one
  prompt are sampled from different numbers, the same in both backends and on resume.
- ``outcome_advantages``: the token rewards of ``shape_rewards`` (the clipped score on the
  score slot, the KL penalty with ``kl_in: reward``), then per estimator:
  grpo / dr_grpo / rloo on each answer's summed token reward (a too-short answer, whose mask
  is empty, counts in its group with 0), reinforce_plus_plus on the token rewards
  (discounted returns whitened over the buffer).
- ``rollout_correction``: TIS weights or the MIS mask from the sampler's recorded log-probs
  against the training forward's (``shared.rollout_correction``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.group_advantages import (
    grpo_advantages,
    reinforce_plus_plus_returns,
    rloo_advantages,
)
from shared.masked import masked_whiten
from shared.presets import CRITIC_FREE_ESTIMATORS, PPOConventions
from shared.reward_fn import is_served
from shared.rewards import episode_mask, shape_rewards
from shared.rollout_correction import mis_mask, tis_weights

__all__ = ["group_prompts", "models_used", "outcome_advantages", "rollout_correction",
           "served_name"]

ACTOR, REFERENCE, CRITIC, REWARD_MODEL, REWARD_FN = (
    "actor", "reference", "critic", "reward_model", "reward_fn")


def models_used(config: Any) -> tuple[str, ...]:
    """The models a PPO run with ``config`` builds and runs, in order (see module doc). A
    served role (``ppo.initial_policy.url``, ``ppo.reward_model.url``, ``ppo.critic.url``) is
    listed as
    ``<name>@<url>``: the backend builds nothing for it, the loop calls the server."""
    ppo = config.ppo
    models = [ACTOR, served_name(REFERENCE, ppo.initial_policy.url)]
    if ppo.conventions.advantage_estimator not in CRITIC_FREE_ESTIMATORS:
        models.append(served_name(CRITIC, ppo.critic.url))
    if ppo.reward_model_weight != 0:
        models.append(served_name(REWARD_MODEL, ppo.reward_model.url))
    if ppo.reward_function is not None:
        models.append(served_name(REWARD_FN, ppo.reward_function
                                  if is_served(ppo.reward_function) else None))
    return tuple(models)


def served_name(model: str, url: str | None) -> str:
    """``model`` run in process (no ``url``), else ``model@url``."""
    return model if url is None else f"{model}@{url}"


def group_prompts(prompts: Any, n: int) -> Any:
    """The prompt batch with every prompt repeated ``n`` times in place (a ``take``-able
    batch: ``shared.data.PromptBatch``)."""
    if n == 1:
        return prompts
    return prompts.take(np.repeat(np.arange(len(prompts)), n))


def outcome_advantages(scores: np.ndarray, logprobs: np.ndarray, ref_logprobs: np.ndarray,
                       response_mask: np.ndarray, *, conventions: PPOConventions,
                       kl_coef: float, group_size: int) -> dict[str, np.ndarray]:
    """Token rewards, KL, advantages and returns of a critic-free estimator over one buffer
    (whole groups, in the group layout). ``returns`` are the advantages of the group
    estimators (nothing regresses on them) and the discounted returns of REINFORCE++.

    Args:
      scores: [B] end scores; logprobs, ref_logprobs: [B, T] (training forward and
        reference, unmasked); response_mask: [B, T].
      conventions: the run's ``PPOConventions`` (advantage_estimator, KL placement and
        estimator, reward clip and position, gamma, whiten_advantages).
      kl_coef: the KL controller's coefficient.
      group_size: ``ppo.n_samples_per_prompt``.
    """
    c = conventions
    estimator = c.advantage_estimator
    if estimator not in CRITIC_FREE_ESTIMATORS:
        raise ValueError(f"advantage_estimator {estimator!r} is not critic-free; allowed "
                         f"values: {list(CRITIC_FREE_ESTIMATORS)}")
    token_rewards, kl = shape_rewards(
        scores, logprobs, ref_logprobs, response_mask,
        kl_coef=0.0 if c.kl_in == "loss" else kl_coef, kl_estimator=c.kl_estimator,
        kl_clamp=c.kl_clamp, reward_clip=c.reward_clip, position=c.reward_position,
        zero_after_end=c.zero_after_end)
    token_rewards = np.asarray(token_rewards, np.float32)
    mask = np.asarray(response_mask, np.float32)
    if estimator == "reinforce_plus_plus":
        episode = (episode_mask(response_mask, position=c.reward_position)
                   if c.gae_mask_mode == "zero_after_end" else response_mask)
        returns = np.asarray(reinforce_plus_plus_returns(token_rewards, episode, gamma=c.gamma),
                             np.float32)
        # verl / OpenRLHF whiten the returns over every valid token of the global batch
        advantages = masked_whiten(returns, mask)
    else:
        sequence = token_rewards.sum(-1)
        if estimator == "rloo":
            advantages = rloo_advantages(sequence, mask, group_size=group_size)
        else:
            advantages = grpo_advantages(sequence, mask, group_size=group_size,
                                         scale_by_std=estimator == "grpo")
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        returns = advantages
    return {"token_rewards": token_rewards, "kl": np.asarray(kl, np.float32),
            "advantages": np.asarray(advantages, np.float32),
            "returns": np.asarray(returns, np.float32)}


def rollout_correction(train_logprobs: np.ndarray, rollout_logprobs: np.ndarray,
                       response_mask: np.ndarray, *, conventions: PPOConventions
                       ) -> tuple[np.ndarray | None, np.ndarray]:
    """``(importance_weights or None, response_mask)`` under
    ``conventions.rollout_correction``: "tis" returns the truncated weights (the mask as it
    is), "mis" the mask with the rejected tokens (or rows) taken out, "none" neither."""
    c = conventions
    mask = np.asarray(response_mask, np.float32)
    if c.rollout_correction == "none":
        return None, mask
    args = (np.asarray(train_logprobs, np.float32), np.asarray(rollout_logprobs, np.float32),
            mask)
    if c.rollout_correction == "tis":
        weights = tis_weights(*args, threshold=c.rollout_correction_threshold,
                              level=c.rollout_correction_level)
        return np.asarray(weights, np.float32), mask
    keep = mis_mask(*args, threshold=c.rollout_correction_threshold,
                    level=c.rollout_correction_level)
    return None, mask * np.asarray(keep, np.float32)
