"""The losses the trainers will differentiate, written once in array-API code for both backends.

Each objective is `objective(forward, batch, **static) -> (loss, aux)`: `forward(ids, mask)` is
the model (logits [B, T, V] of a causal LM, or values [B, T] of a value model), `batch` a dict of
torch tensors or JAX arrays with the keys listed in the docstring, `static` hashable keyword
arguments (JAX compiles once per distinct value). The math is `shared`'s; only the slicing that
aligns model outputs with answers lives here, following docs/architecture.md:

- response-aligned logits of a rollout: `logits[:, P - 1 : -1]` predict the answer tokens
  `sequences[:, P:]`, and the critic's `values[:, P - 1 : -1]` are V(x, y_<t);
- reward end scores: the value at the last real token of each row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat

import shared
from shared.presets import PPOConventions

__all__ = [
    "bradley_terry_objective",
    "dpo_objective",
    "dschat_pairwise_objective",
    "end_scores",
    "entropy_objective",
    "gspo_actor_objective",
    "kway_objective",
    "ppo_actor_objective",
    "ppo_critic_objective",
    "ptx_objective",
    "rollout_corrected_actor_objective",
    "response_logits",
    "sft_objective",
]


def end_scores(values: Any, attention_mask: Any) -> Any:
    """values[b, last real token of row b] -> [B] (index 0 for a row without real token).

    For a left-padded prompt followed by a right-padded answer this is DeepSpeed-Chat's
    `forward_value` end score (`torch_rlhf.models.gather_end_values`).
    """
    xp = array_api_compat.array_namespace(values, attention_mask)
    length = values.shape[-1]
    t = xp.arange(length, device=array_api_compat.device(values))[None, :]  # [1, T]
    last = xp.max(xp.where(attention_mask != 0, t, xp.full_like(t, -1)), axis=-1)
    last = xp.maximum(last, xp.zeros_like(last))
    return xp.take_along_axis(values, last[:, None], axis=-1)[:, 0]


def sft_objective(forward, batch) -> tuple[Any, dict[str, Any]]:
    """Step 1: `shared.sft_loss` of the causal LM.

    batch: input_ids, attention_mask, loss_mask ([B, L]; loss_mask aligned with input_ids as in
    `shared.data.SFTBatch`, so the shifted mask is loss_mask[:, 1:]).
    """
    ids = batch["input_ids"]
    logits = forward(ids, batch["attention_mask"])  # [B, L, V]
    loss = shared.sft_loss(logits[:, :-1], ids[:, 1:], batch["loss_mask"][:, 1:])
    return loss, {}


def ptx_objective(forward, batch, *, unsup_coef: float) -> tuple[Any, dict[str, Any]]:
    """PPO-ptx: unsup_coef * next-token loss on unsupervised text (`shared.ppo_ptx_objective`
    with a zero PPO term, i.e. the ptx part of the actor objective).

    batch: input_ids, attention_mask ([B, L]; every real token is a target, as
    `shared.data.TextBatch`).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = forward(ids, mask)  # [B, L, V]
    ptx = shared.sft_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1])
    return shared.ppo_ptx_objective(0.0, ptx, unsup_coef=unsup_coef), {"ptx_loss": ptx}


def response_logits(forward, batch) -> tuple[Any, Any]:
    """(logits [B, A, V] predicting the answer, answer tokens [B, A]) of a rollout batch."""
    seq = batch["sequences"]  # [B, P + A]
    prompt_length = seq.shape[1] - batch["response_mask"].shape[1]
    logits = forward(seq, batch["attention_mask"])  # [B, P + A, V]
    return logits[:, prompt_length - 1 : -1], seq[:, prompt_length:]


def entropy_objective(forward, batch) -> tuple[Any, dict[str, Any]]:
    """`shared.entropy_bonus` of the actor over the answer tokens (rollout batch)."""
    logits, _ = response_logits(forward, batch)
    return shared.entropy_bonus(logits, batch["response_mask"]), {}


def ppo_actor_objective(
    forward, batch, *, conventions: PPOConventions
) -> tuple[Any, dict[str, Any]]:
    """The actor loss of `shared.ppo_losses` (policy loss, entropy bonus and KL-as-loss as the
    conventions ask).

    batch (rollout): sequences, attention_mask ([B, P + A]), response_mask, old_logprobs,
    ref_logprobs, advantages, old_values, returns ([B, A]), normalizer (0-d global count).
    """
    logits, answer = response_logits(forward, batch)
    logprobs = shared.token_logprobs(logits, answer)  # [B, A]
    entropy = shared.entropy_from_logits(logits) if conventions.entropy_coef else None
    actor, _, stats = shared.ppo_losses(
        logprobs, batch["old_logprobs"], batch["advantages"], batch["old_values"],
        batch["old_values"], batch["returns"], batch["response_mask"], conventions=conventions,
        entropy=entropy, ref_logprobs=batch["ref_logprobs"], normalizer=batch["normalizer"],
    )
    keep = ("pg_loss", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max", "entropy",
            "kl_loss", "dual_clip_fraction")
    return actor, {k: v for k, v in stats.items() if k in keep}


def ppo_critic_objective(
    forward, batch, *, conventions: PPOConventions
) -> tuple[Any, dict[str, Any]]:
    """The critic loss of `shared.ppo_losses` (clipped value loss) on V(x, y_<t).

    batch: as `ppo_actor_objective`.
    """
    seq = batch["sequences"]
    prompt_length = seq.shape[1] - batch["response_mask"].shape[1]
    values = forward(seq, batch["attention_mask"])[:, prompt_length - 1 : -1]  # [B, A]
    # The actor's terms are constants here; no entropy needed for them.
    no_entropy = dataclasses.replace(conventions, entropy_coef=0.0)
    _, critic, stats = shared.ppo_losses(
        batch["old_logprobs"], batch["old_logprobs"], batch["advantages"], values,
        batch["old_values"], batch["returns"], batch["response_mask"], conventions=no_entropy,
        ref_logprobs=batch["ref_logprobs"], normalizer=batch["normalizer"],
    )
    return critic, {k: stats[k] for k in ("value_clip_fraction", "value_mean")}


def _pair_values(forward, batch) -> tuple[Any, Any, Any]:
    xp = array_api_compat.array_namespace(batch["chosen_input_ids"])
    ids = xp.concat([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)  # [2B, L]
    mask = xp.concat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    return forward(ids, mask), mask, batch["chosen_input_ids"].shape[0]


def bradley_terry_objective(forward, batch) -> tuple[Any, dict[str, Any]]:
    """Step 2: `shared.bradley_terry_loss` on the end scores of chosen and rejected answers
    (one forward over both, as DeepSpeed-Chat concatenates them).

    batch: chosen_input_ids, chosen_attention_mask, rejected_input_ids, rejected_attention_mask.
    """
    values, mask, n = _pair_values(forward, batch)
    scores = end_scores(values, mask)  # [2B]
    loss, stats = shared.bradley_terry_loss(scores[:n], scores[n:])
    return loss, {"chosen_scores": scores[:n], "rejected_scores": scores[n:], **stats}


def dschat_pairwise_objective(
    forward, batch, *, pad_token_id: int, num_padding_at_beginning: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Step 2, DeepSpeed-Chat's per-token pairwise loss (`shared.dschat_pairwise_loss`).

    batch: as `bradley_terry_objective` (padding positions hold `pad_token_id`).
    """
    values, _, n = _pair_values(forward, batch)
    loss, stats = shared.dschat_pairwise_loss(
        values[:n], values[n:], batch["chosen_input_ids"], batch["rejected_input_ids"],
        pad_token_id=pad_token_id, num_padding_at_beginning=num_padding_at_beginning,
    )
    return loss, stats


def kway_objective(forward, batch) -> tuple[Any, dict[str, Any]]:
    """Step 2, InstructGPT's K-way ranking loss (`shared.kway_ranking_loss`).

    batch: input_ids, attention_mask ([N, K, L], best first), num_valid ([N]).
    """
    xp = array_api_compat.array_namespace(batch["input_ids"])
    n, k, length = batch["input_ids"].shape
    ids = xp.reshape(batch["input_ids"], (n * k, length))
    mask = xp.reshape(batch["attention_mask"], (n * k, length))
    scores = xp.reshape(end_scores(forward(ids, mask), mask), (n, k))  # [N, K]
    loss, stats = shared.kway_ranking_loss(scores, num_valid=batch["num_valid"])
    return loss, {"scores": scores, "accuracy": stats["accuracy"]}


def gspo_actor_objective(
    forward, batch, *, clip_low: float, clip_high: float
) -> tuple[Any, dict[str, Any]]:
    """`shared.gspo_policy_loss` (sequence-level ratio, seq-mean-token-mean) of the actor.

    batch: as `ppo_actor_objective` (its normalizer is not used: GSPO's rows are local).
    """
    logits, answer = response_logits(forward, batch)
    logprobs = shared.token_logprobs(logits, answer)  # [B, A]
    return shared.gspo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"],
                                   batch["response_mask"], clip_low=clip_low,
                                   clip_high=clip_high)


def rollout_corrected_actor_objective(
    forward, batch, *, threshold: float, ratio_level: str, mis_threshold: float
) -> tuple[Any, dict[str, Any]]:
    """`shared.policy_loss` with TIS weights and an MIS mask from the sampler's log-probs.

    batch: as `ppo_actor_objective` plus rollout_logprobs ([B, A], the sampler's record of
    the same tokens); the TIS weights compare it with old_logprobs (the trainer's).
    """
    logits, answer = response_logits(forward, batch)
    logprobs = shared.token_logprobs(logits, answer)  # [B, A]
    old, roll, mask = batch["old_logprobs"], batch["rollout_logprobs"], batch["response_mask"]
    keep = mask * shared.mis_mask(old, roll, mask, threshold=mis_threshold, level=ratio_level)
    weights = shared.tis_weights(old, roll, mask, threshold=threshold, level=ratio_level)
    loss, stats = shared.policy_loss(logprobs, old, batch["advantages"], keep, clip_low=0.2,
                                     importance_weights=weights,
                                     normalizer=shared.loss_normalizer(mask, mode="token-mean"))
    gap = shared.rollout_logprob_gap(old, roll, mask)
    return loss, {"clip_fraction": stats["clip_fraction"], "kept": shared.masked_mean(keep, mask),
                  **{f"gap/{k}": v for k, v in gap.items()}}


def dpo_objective(
    forward, batch, *, prompt_tokens: int, beta: float, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Any, dict[str, Any]]:
    """`shared.dpo_loss` of the causal LM on a pairwise batch (one forward over both answers).

    The first `prompt_tokens` real tokens of each row are the prompt; the answer's sequence
    log-prob sums the next-token log-probs of the later real tokens (`sequence_logprobs`,
    averaged for IPO as TRL does).

    batch: as `bradley_terry_objective` plus ref_chosen_logprobs, ref_rejected_logprobs ([B],
    the frozen reference's sequence log-probs).
    """
    logits, mask, n = _pair_values(forward, batch)  # [2B, L, V], [2B, L]
    xp = array_api_compat.array_namespace(logits)
    ids = xp.concat([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    real = mask != 0
    answer = real & (xp.cumulative_sum(xp.astype(real, ids.dtype), axis=-1) > prompt_tokens)
    token_lp = shared.token_logprobs(logits[:, :-1], ids[:, 1:])  # [2B, L - 1]
    seq_lp = shared.sequence_logprobs(token_lp, answer[:, 1:], average=loss_type == "ipo")
    return shared.dpo_loss(seq_lp[:n], seq_lp[n:], batch["ref_chosen_logprobs"],
                           batch["ref_rejected_logprobs"], beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing)
