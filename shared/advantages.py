"""Generalised advantage estimation and discounted returns over response tokens.

Time indices (response-aligned [B, T]): r_t = token_rewards[:, t] is the reward for
emitting y_t, v_t = values[:, t] = V(x, y_<t) is the critic's estimate before y_t,
and the state after the last slot is terminal (v_T = 0).

    delta_t = r_t + gamma * v_{t+1} - v_t
    A_t     = delta_t + gamma * lam * A_{t+1}          (A_T = 0)
    R_t     = A_t + v_t                                (the critic's target)

Mask modes for `gae_advantages`:
  zero_after_end  rewards and values are zeroed where mask == 0, then the plain
                  recursion runs over all T slots (DeepSpeed-Chat
                  `get_advantages_and_returns` after its `old_rewards[i, ends[i]:] = 0`
                  loop; OpenRLHF and NeMo-Aligner multiply by the mask first). Pass
                  `episode_mask(...)` from `shared.rewards` to reproduce DeepSpeed-Chat
                  and TRL, whose episode includes the padding slot holding the score.
  skip_masked     a masked step is skipped: v_{t+1} and A_{t+1} are carried through it
                  unchanged (verl `compute_gae_advantage_return`, Tunix
                  `compute_gae_advantages`); needed when masked tokens sit inside the
                  response (e.g. tool outputs).
For a prefix mask both modes give the same advantages on the valid tokens.

The reverse recursion is a Python loop over the static T with a final stack: no
in-place writes, so it traces under jax.jit (unrolled; T-step graph) and autograd.
"""

from __future__ import annotations

from shared._array import Array, as_bool, check_choice, check_rank, check_same_shape, namespace

GAE_MASK_MODES = ("zero_after_end", "skip_masked")


def gae_advantages(
    token_rewards: Array,
    values: Array,
    response_mask: Array,
    *,
    gamma: float,
    lam: float,
    mask_mode: str = "skip_masked",
) -> tuple[Array, Array]:
    """GAE advantages and lambda-returns (module docstring for the formula and modes).

    Args:
      token_rewards: [B, T] r_t, detached.
      values: [B, T] v_t = V(x, y_<t) from the rollout critic, detached.
      response_mask: [B, T] float or bool mask of the steps in the episode.
      gamma: discount in [0, 1].
      lam: GAE lambda in [0, 1].
      mask_mode: "zero_after_end" or "skip_masked".

    Returns:
      advantages: [B, T], 0 where masked.
      returns: [B, T] A_t + v_t, 0 where masked.

    Source: Schulman et al. 2016 (arXiv:1506.02438) eq. 16; DeepSpeed-Chat
    `get_advantages_and_returns` (after trlx); verl `compute_gae_advantage_return`.
    """
    xp = namespace(token_rewards, values, response_mask)
    check_rank(token_rewards, 2, "token_rewards", "[B, T]")
    check_same_shape("token_rewards", token_rewards, "values", values)
    check_same_shape("token_rewards", token_rewards, "response_mask", response_mask)
    check_choice("mask_mode", mask_mode, GAE_MASK_MODES)
    valid = as_bool(xp, response_mask)
    zeros = xp.zeros_like(values)
    rewards = xp.where(valid, token_rewards, zeros)
    values = xp.where(valid, values, zeros)

    length = values.shape[-1]
    next_value = zeros[:, 0]
    running = zeros[:, 0]
    advantages_reversed = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + (gamma * lam) * running
        if mask_mode == "skip_masked":
            next_value = xp.where(valid[:, t], values[:, t], next_value)
            running = xp.where(valid[:, t], gae_t, running)
        else:
            next_value = values[:, t]
            running = gae_t
        advantages_reversed.append(running)
    advantages = xp.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return xp.where(valid, advantages, zeros), xp.where(valid, returns, zeros)


def discounted_returns(rewards: Array, response_mask: Array, *, gamma: float) -> Array:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} over the valid steps (G_T = 0).

    Masked steps are skipped (G carried through, their reward ignored), matching the
    `skip_masked` GAE, so gae_advantages(lam=1) = discounted_returns - values.

    Args:
      rewards: [B, T] r_t.
      response_mask: [B, T] float or bool mask.
      gamma: discount in [0, 1].

    Returns:
      [B, T] returns, 0 where masked.

    Source: Sutton & Barto (2018) eq. 3.9; REINFORCE returns (verl
    `compute_reinforce_plus_plus_outcome_advantage`).
    """
    xp = namespace(rewards, response_mask)
    check_rank(rewards, 2, "rewards", "[B, T]")
    check_same_shape("rewards", rewards, "response_mask", response_mask)
    valid = as_bool(xp, response_mask)
    zeros = xp.zeros_like(rewards)
    running = zeros[:, 0]
    returns_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        running = xp.where(valid[:, t], rewards[:, t] + gamma * running, running)
        returns_reversed.append(running)
    returns = xp.stack(returns_reversed[::-1], axis=1)
    return xp.where(valid, returns, zeros)
