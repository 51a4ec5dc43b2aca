"""Token-level PPO rewards: a KL penalty on every token plus the reward-model score at
one position per sequence.

Arrays are response-aligned [B, T]: index t is the t-th response token and
`response_mask[b, t]` is 1 for real response tokens (the EOS included when one was
generated) and 0 for the padding after the end. The mask is assumed to be a prefix
(ones, then zeros).

Score positions:
  last_token  the last index with mask == 1: the EOS when present, else the last
              generated token. The project default (OpenRLHF `compute_reward`,
              NeMo-Aligner `calculate_ppo_rewards`).
  dschat      n = min(sum_t mask, T - 1), i.e. ONE PAST the last real token (the first
              padding slot) unless the response fills all T slots. This reproduces
              DeepSpeed-Chat's `compute_rewards` (ends = start + mask.sum() + 1, score
              added at rewards[start:ends][-1]) and TRL's PPOTrainer
              (`sequence_lengths_p1`). When the mask leaves out pad tokens and the
              tokenizer's pad == eos (`PPOConventions.mask_pad_tokens`, as
              DeepSpeed-Chat), the EOS is masked as padding and n lands exactly on the
              EOS; otherwise the score sits on a padding position.
"""

from __future__ import annotations

from shared._array import (
    Array,
    as_bool,
    check_choice,
    check_rank,
    check_same_shape,
    index_dtype,
    namespace,
    positions,
)
from shared.kl import kl_penalty

SCORE_POSITIONS = ("last_token", "dschat")


def score_position(response_mask: Array, *, position: str) -> Array:
    """Index of the response token that receives the sequence score, per row.

    last_token: max{t : mask[b, t] = 1} (0 for a row with no valid token).
    dschat:     min(sum_t mask[b, t], T - 1) (see module docstring: one past the end).

    Args:
      response_mask: [B, T] float or bool mask.
      position: "last_token" or "dschat".

    Returns:
      [B] integer indices in [0, T - 1].

    Source: OpenRLHF `compute_reward` (eos_indices); DeepSpeed-Chat `compute_rewards`.
    """
    xp = namespace(response_mask)
    check_rank(response_mask, 2, "response_mask", "[B, T]")
    check_choice("position", position, SCORE_POSITIONS)
    valid = as_bool(xp, response_mask)
    length = response_mask.shape[-1]
    idx_dtype = index_dtype(xp)
    if position == "dschat":
        count = xp.sum(xp.astype(valid, idx_dtype), axis=-1)
        return xp.minimum(count, xp.full_like(count, length - 1))
    t = positions(xp, response_mask, length, idx_dtype)
    last = xp.max(xp.where(valid, t[None, :], xp.full_like(t[None, :], -1)), axis=-1)
    return xp.maximum(last, xp.zeros_like(last))


def episode_mask(response_mask: Array, *, position: str) -> Array:
    """Bool mask of the steps up to and including the score position: t <= n_b.

    This is the 'before the end' region of DeepSpeed-Chat's and TRL's GAE (rewards and
    values are zeroed after it). For `last_token` it equals the response mask; for
    `dschat` it also covers the padding slot that carries the score.

    Args:
      response_mask: [B, T] float or bool mask.
      position: "last_token" or "dschat".

    Returns:
      [B, T] bool.
    """
    xp = namespace(response_mask)
    pos = score_position(response_mask, position=position)
    valid = as_bool(xp, response_mask)
    t = positions(xp, response_mask, response_mask.shape[-1], pos.dtype)
    keep = t[None, :] <= pos[:, None]
    if position == "last_token":
        keep = keep & xp.any(valid, axis=-1, keepdims=True)
    return keep


def shape_rewards(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    response_mask: Array,
    *,
    kl_coef: Array | float,
    kl_estimator: str = "k1",
    kl_clamp: float | None = None,
    reward_clip: float | None = None,
    position: str = "last_token",
    zero_after_end: bool = False,
) -> tuple[Array, Array]:
    """Per-token rewards r_t = -kl_coef * kl_t + [t = n_b] * clip(score_b).

    kl_t = kl_penalty(logprobs, ref_logprobs)[t] is kept on
      - the valid tokens (mask == 1) when zero_after_end is False;
      - every t <= n_b, masked or not, when zero_after_end is True: DeepSpeed-Chat
        computes the penalty on the full row and only zeroes the rewards AFTER its end
        index, so the padding slot n_b of the `dschat` position keeps its KL term.
    and is 0 elsewhere. n_b is `score_position(response_mask, position=position)`.
    With `last_token`, a row with no valid token gets no score.

    KL-as-loss mode (kl_in="loss" in the presets): pass kl_coef=0, the rewards are
    then the clipped scores alone and `kl` is still returned for logging.

    Args:
      scores: [B] reward-model scores, detached.
      logprobs: [B, T] log pi_old(y_t | x, y_<t) of the sampled tokens, detached.
      ref_logprobs: [B, T] reference-policy log-probs, detached.
      response_mask: [B, T] float or bool mask.
      kl_coef: Python float or 0-d array (e.g. from `adaptive_kl_controller`).
      kl_estimator: "k1" | "abs" | "k2" | "k3" (see `kl_penalty`).
      kl_clamp: optional clip of the per-token estimate to [-kl_clamp, kl_clamp].
      reward_clip: scores are clipped to [-reward_clip, reward_clip]; None = no clip.
      position: "last_token" | "dschat" (see `score_position`).
      zero_after_end: see above.

    Returns:
      token_rewards: [B, T].
      kl: [B, T] the per-token KL estimate as it entered the rewards (zeros where
        dropped), before multiplying by kl_coef.

    Source: Ziegler et al. 2019 (arXiv:1909.08593) eq. 2; Ouyang et al. 2022
    (InstructGPT) eq. 2; DeepSpeed-Chat `compute_rewards` and `train_rlhf`.
    """
    xp = namespace(scores, logprobs, ref_logprobs, response_mask)
    check_rank(scores, 1, "scores", "[B]")
    check_rank(logprobs, 2, "logprobs", "[B, T]")
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    check_same_shape("logprobs", logprobs, "response_mask", response_mask)
    if scores.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"scores must have shape [B] = [{logprobs.shape[0]}], got {tuple(scores.shape)}"
        )
    if reward_clip is not None and not reward_clip > 0:
        raise ValueError(f"reward_clip must be positive or None, got {reward_clip!r}")

    kl_raw = kl_penalty(logprobs, ref_logprobs, estimator=kl_estimator, clamp=kl_clamp)
    valid = as_bool(xp, response_mask)
    keep = episode_mask(response_mask, position=position) if zero_after_end else valid
    zeros = xp.zeros_like(kl_raw)
    kl = xp.where(keep, kl_raw, zeros)

    score = scores if reward_clip is None else xp.clip(scores, -reward_clip, reward_clip)
    score = xp.astype(score, kl_raw.dtype)
    pos = score_position(response_mask, position=position)
    t = positions(xp, response_mask, response_mask.shape[-1], pos.dtype)
    at_score = t[None, :] == pos[:, None]
    if position == "last_token":
        at_score = at_score & xp.any(valid, axis=-1, keepdims=True)
    placed = xp.where(at_score, score[:, None], zeros)
    return -kl_coef * kl + placed, kl
