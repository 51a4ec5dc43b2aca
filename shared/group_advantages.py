"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO, REINFORCE++ and ReMax.

Group layout: with n samples per prompt, the batch holds B = P * n rows and rows
i*n .. i*n + n - 1 are the n answers to prompt i (verl's `repeat(interleave=True)`,
TRL's `num_generations` layout). A micro-batch or rank shard must hold whole groups.

Outcome estimators (GRPO, RLOO, ReMax) turn one score per answer into one advantage per
answer and broadcast it over that answer's valid tokens; REINFORCE++ works on per-token
rewards (score on the last token, per-token KL folded in) and normalises the returns over
the whole (global) batch. Every output is [B, T] and 0 where the response mask is 0.

With s the [P, n] scores of a group and s_ij the j-th answer to prompt i:
  GRPO        A_ij = (s_ij - mean_j s_ij) / (std_j s_ij + eps)       (scale_by_std)
  Dr. GRPO    A_ij = s_ij - mean_j s_ij                              (scale_by_std=False)
  RLOO        A_ij = s_ij - (sum_k s_ik - s_ij) / (n - 1)  = n / (n - 1) (s_ij - mean_j s_ij)
  ReMax       A_b  = s_b - s_b^greedy
  REINFORCE++ G_t  = sum_{u >= t} gamma^(u - t) (r_u - beta kl_u),  A = whiten(G) over the batch
"""

from __future__ import annotations

from shared._array import (
    Array,
    as_bool,
    as_float,
    check_rank,
    check_same_shape,
    namespace,
    safe_divide,
)
from shared.advantages import discounted_returns
from shared.masked import masked_whiten


def _groups(xp, scores: Array, group_size: int) -> Array:
    """scores [B] -> [B / n, n] (rows i*n .. i*n + n - 1 are group i)."""
    check_rank(scores, 1, "scores", "[B]")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"the batch ({scores.shape[0]} rows) must hold whole groups of "
            f"group_size={group_size}"
        )
    return xp.reshape(scores, (scores.shape[0] // group_size, group_size))


def _broadcast(xp, per_answer: Array, response_mask: Array) -> Array:
    """[B] advantages -> [B, T], 0 where masked."""
    check_rank(response_mask, 2, "response_mask", "[B, T]")
    if response_mask.shape[0] != per_answer.shape[0]:
        raise ValueError(
            f"response_mask must have {per_answer.shape[0]} rows, got {tuple(response_mask.shape)}"
        )
    full = xp.broadcast_to(per_answer[:, None], response_mask.shape)
    return xp.where(as_bool(xp, response_mask), full, xp.zeros_like(full))


def grpo_advantages(
    scores: Array,
    response_mask: Array,
    *,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Array:
    """GRPO group-normalised outcome advantages (Dr. GRPO with scale_by_std=False).

    A_ij = (s_ij - mean_i) / (std_i + eps), mean_i and std_i over the n answers of prompt i,
    std unbiased (torch.std, as verl and TRL). A group of one answer gets A = 0 (its mean is
    its score; its std, undefined, is taken as 0). verl instead leaves a lone answer's score
    unchanged (mean 0, std 1); TRL gives NaN there.

    Args:
      scores: [B] one score per answer, B = P * n in the group layout (module docstring).
      response_mask: [B, T] float or bool mask of the answer tokens.
      group_size: n, samples per prompt (static).
      scale_by_std: divide by std + eps (GRPO); False is Dr. GRPO's unscaled advantage.
      eps: added to the std (verl's epsilon 1e-6; TRL uses 1e-4).

    Returns:
      [B, T] advantages, A_ij on every valid token of answer ij, 0 where masked.

    Source: Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300) sec. 4.1.2 (outcome
    supervision); Liu et al. 2025 (Dr. GRPO, arXiv:2503.20783) eq. 3; verl
    `compute_grpo_outcome_advantage` (norm_adv_by_std_in_grpo); TRL `GRPOTrainer`
    (`scale_rewards`).
    """
    xp = namespace(scores, response_mask)
    groups = _groups(xp, scores, group_size)  # [P, n]
    mean = xp.mean(groups, axis=-1, keepdims=True)
    centred = groups - mean
    if scale_by_std:
        dof = float(max(group_size - 1, 1))
        std = xp.sqrt(xp.sum(centred * centred, axis=-1, keepdims=True) / dof)
        centred = centred / (std + eps)
    return _broadcast(xp, xp.reshape(centred, (-1,)), response_mask)


def rloo_advantages(scores: Array, response_mask: Array, *, group_size: int) -> Array:
    """REINFORCE leave-one-out: each answer's baseline is the mean of the other n - 1.

    A_ij = s_ij - (sum_k s_ik - s_ij) / (n - 1), equal to n / (n - 1) * (s_ij - mean_i).

    Args:
      scores: [B] one score per answer in the group layout (module docstring).
      response_mask: [B, T] float or bool mask.
      group_size: n >= 2 (static).

    Returns:
      [B, T] advantages, 0 where masked.

    Source: Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!");
    Ahmadian et al. 2024 (arXiv:2402.14740) eq. 6; verl `compute_rloo_outcome_advantage`;
    TRL `RLOOTrainer`; OpenRLHF `advantage_estimator=rloo`.
    """
    xp = namespace(scores, response_mask)
    if not (isinstance(group_size, int) and group_size >= 2):
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size!r}")
    groups = _groups(xp, scores, group_size)
    baseline = (xp.sum(groups, axis=-1, keepdims=True) - groups) / float(group_size - 1)
    return _broadcast(xp, xp.reshape(groups - baseline, (-1,)), response_mask)


def remax_advantages(scores: Array, greedy_scores: Array, response_mask: Array) -> Array:
    """ReMax: the score of each sampled answer minus the score of the greedy answer.

    A_b = s_b - s_b^greedy on every valid token of answer b (gamma = 1, outcome reward).

    Args:
      scores: [B] scores of the sampled answers.
      greedy_scores: [B] scores of the greedy (argmax-decoded) answer to the same prompt.
      response_mask: [B, T] float or bool mask.

    Returns:
      [B, T] advantages, 0 where masked.

    Source: Li et al. 2023 (ReMax, arXiv:2310.10505) Algorithm 1; verl
    `compute_remax_outcome_advantage` (returns minus `reward_baselines`).
    """
    xp = namespace(scores, greedy_scores, response_mask)
    check_rank(scores, 1, "scores", "[B]")
    check_same_shape("scores", scores, "greedy_scores", greedy_scores)
    return _broadcast(xp, scores - greedy_scores, response_mask)


def whitening_moments(x: Array, mask: Array) -> Array:
    """Local moments [count, sum, sum of squares] of the valid entries of `x`.

    Sum them over micro-batches and ranks (one all-reduce) and pass the total as
    `moments` to `reinforce_plus_plus_advantages`, so every shard whitens with the global
    mean and variance.

    Args:
      x: [B, T] values (e.g. `reinforce_plus_plus_returns`).
      mask: [B, T] float or bool mask.

    Returns:
      [3] array (count, sum, sum of squares), dtype of `x`.
    """
    xp = namespace(x, mask)
    check_same_shape("x", x, "mask", mask)
    m = as_float(xp, mask, x.dtype)
    xm = xp.where(as_bool(xp, mask), x, xp.zeros_like(x))
    return xp.stack([xp.sum(m), xp.sum(xm), xp.sum(xm * xm)])


def reinforce_plus_plus_returns(
    token_rewards: Array,
    response_mask: Array,
    *,
    gamma: float = 1.0,
    kl: Array | None = None,
    kl_coef: float = 0.0,
) -> Array:
    """REINFORCE++ returns: G_t = sum_{u >= t} gamma^(u - t) (r_u - kl_coef * kl_u).

    Args:
      token_rewards: [B, T] r_t (the score on the answer's last token; 0 elsewhere).
      response_mask: [B, T] float or bool mask.
      gamma: discount in [0, 1].
      kl: optional [B, T] per-token KL estimate (`kl_penalty`), detached.
      kl_coef: beta, the weight of the KL folded into the rewards.

    Returns:
      [B, T] returns, 0 where masked.

    Source: Hu 2025 (REINFORCE++, arXiv:2501.03262) eqs. 1-2; verl
    `compute_reinforce_plus_plus_outcome_advantage`; OpenRLHF `compute_reward` +
    `get_cumulative_returns`.
    """
    rewards = token_rewards
    if kl is not None:
        check_same_shape("token_rewards", token_rewards, "kl", kl)
        rewards = token_rewards - kl_coef * kl
    return discounted_returns(rewards, response_mask, gamma=gamma)


def reinforce_plus_plus_advantages(
    token_rewards: Array,
    response_mask: Array,
    *,
    gamma: float = 1.0,
    kl: Array | None = None,
    kl_coef: float = 0.0,
    moments: Array | None = None,
    eps: float = 1e-8,
) -> Array:
    """REINFORCE++ advantages: the returns whitened over the whole (global) batch.

    A = (G - mean) / sqrt(var + eps), mean and unbiased var over all valid tokens of the
    batch (verl `masked_whiten`). A sharded caller passes the global `moments` (the sum
    over shards of `whitening_moments(G, mask)`) so that every shard uses the same
    statistics; without them this batch's own are used.

    Args:
      token_rewards, response_mask, gamma, kl, kl_coef: see `reinforce_plus_plus_returns`.
      moments: optional [3] global (count, sum, sum of squares) of the returns.
      eps: added to the variance.

    Returns:
      [B, T] advantages, 0 where masked.

    Source: as `reinforce_plus_plus_returns`; normalisation as verl's and OpenRLHF's
    global advantage whitening.
    """
    returns = reinforce_plus_plus_returns(
        token_rewards, response_mask, gamma=gamma, kl=kl, kl_coef=kl_coef
    )
    if moments is None:
        return masked_whiten(returns, response_mask, eps=eps)
    xp = namespace(returns, moments)
    check_rank(moments, 1, "moments", "[3]")
    moments = xp.astype(moments, returns.dtype)
    count, total, total_sq = moments[0], moments[1], moments[2]
    mean = safe_divide(xp, total, count)
    var = safe_divide(xp, total_sq - count * mean * mean, count - 1.0)
    out = (returns - mean) / xp.sqrt(var + eps)
    return xp.where(as_bool(xp, response_mask), out, xp.zeros_like(out))
