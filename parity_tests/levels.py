"""The parity levels as functions returning `Row`s; the tests and `rlhf parity` both call these.

- level 2 (`forward_rows`): logits, token log-probs, entropies, values and reward end scores;
- level 3 (`objective_rows` and the per-step helpers): losses, loss statistics and gradients;
- level 5 (`sampler_rows`, in `parity_tests.sampling`): decoding with the same uniforms.

Level 1 (the `shared` functions alone) is the table in `parity_tests.shared_cases`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import shared
from parity_tests import batches as B
from parity_tests import objectives as obj
from parity_tests.harness import (
    ModelPair,
    Objective,
    Row,
    compare,
    compare_grads,
    jax_forward,
    jax_value_and_grad,
    to_numpy,
    torch_forward,
    torch_value_and_grad,
)
from shared.presets import PPOConventions

__all__ = [
    "REWARD_LOSSES",
    "all_terms_conventions",
    "forward_rows",
    "objective_rows",
    "ppo_rows",
    "reward_rows",
    "rollout_for",
    "sft_rows",
]


def _shifted_real(mask: np.ndarray) -> np.ndarray:
    """[B, T - 1]: logits at t predict a real token t + 1 from a real token t."""
    real = mask.astype(bool)
    return real[:, 1:] & real[:, :-1]


def _logprob_entropy(logits: Any, ids: Any) -> tuple[Any, Any]:
    return shared.token_logprobs(logits[:, :-1], ids[:, 1:]), shared.entropy_from_logits(logits)


def forward_rows(
    label: str,
    ids: np.ndarray,
    mask: np.ndarray,
    *,
    lm: ModelPair | None = None,
    value: ModelPair | None = None,
    prompt_length: int = 1,
) -> list[Row]:
    """Level 2 on one batch: the causal LM's logits, `shared.token_logprobs` and
    `shared.entropy_from_logits` (each computed in its own backend), and the value model's
    per-token values and end scores.

    End scores: torch's `ValueModel.end_scores(..., prompt_length=prompt_length)` (DeepSpeed-
    Chat's rule: the token before the first padding of the answer part) against the JAX values
    at the last real token; pass a `prompt_length` past any left padding.
    """
    import jax
    import torch

    rows, real = [], mask.astype(bool)
    if lm is not None:
        t_logits, j_logits = torch_forward(lm, ids, mask), jax_forward(lm, ids, mask)
        rows.append(compare("2", f"logits [{label}]", j_logits, t_logits, "logits", mask=real))
        ids_t = torch.from_numpy(ids.astype(np.int64))
        t_lp, t_ent = _logprob_entropy(torch.from_numpy(t_logits), ids_t)
        j_lp, j_ent = jax.jit(_logprob_entropy)(j_logits, ids.astype(np.int32))
        rows.append(compare("2", f"token_logprobs [{label}]", j_lp, t_lp, "logprobs",
                            mask=_shifted_real(mask)))
        rows.append(compare("2", f"entropy [{label}]", j_ent, t_ent, "logprobs", mask=real))
    if value is not None:
        t_values, j_values = torch_forward(value, ids, mask), jax_forward(value, ids, mask)
        rows.append(compare("2", f"values [{label}]", j_values, t_values, "values", mask=real))
        with torch.no_grad():
            t_end = value.torch.end_scores(torch.from_numpy(ids.astype(np.int64)),
                                           torch.from_numpy(mask.astype(np.int64)),
                                           prompt_length=prompt_length)
        j_end = obj.end_scores(j_values, mask)
        rows.append(compare("2", f"end_scores [{label}]", j_end, t_end, "values"))
    return rows


def objective_rows(
    level: str,
    name: str,
    pair: ModelPair,
    objective: Objective,
    batch: Mapping[str, np.ndarray],
    *,
    aux_masks: Mapping[str, np.ndarray] | None = None,
    **static: Any,
) -> list[Row]:
    """Loss, every auxiliary statistic and the parameter gradients of `objective` on both
    backends. `aux_masks` restricts a statistic to valid entries (e.g. rankings' real answers)."""
    t_loss, t_aux, t_grads = torch_value_and_grad(pair, objective, batch, **static)
    j_loss, j_aux, j_grads = jax_value_and_grad(pair, objective, batch, **static)
    rows = [compare(level, f"{name} loss", j_loss, t_loss, "loss")]
    for key in sorted(t_aux):
        if key not in j_aux:
            rows.append(Row(level, f"{name} {key}", float("inf"), float("inf"),
                            rows[0].tolerance, False, "missing in JAX"))
            continue
        mask = (aux_masks or {}).get(key)
        rows.append(compare(level, f"{name} {key}", j_aux[key], t_aux[key], "loss", mask=mask))
    rows.append(compare_grads(level, f"{name} grad", j_grads, t_grads))
    return rows


def sft_rows(actor: ModelPair, batch: Mapping[str, np.ndarray], label: str) -> list[Row]:
    """Level 3, SFT loss (`shared.sft_loss`) and its gradients."""
    return objective_rows("3", f"sft [{label}]", actor, obj.sft_objective, batch)


REWARD_LOSSES = ("bradley_terry", "dschat_pairwise", "kway")


def reward_rows(
    critic: ModelPair,
    label: str,
    *,
    pairwise: Mapping[str, np.ndarray] | None = None,
    ranking: Mapping[str, np.ndarray] | None = None,
    losses: tuple[str, ...] = REWARD_LOSSES,
    pad_token_id: int = B.PAD,
    num_padding_at_beginning: int = 0,
) -> list[Row]:
    """Level 3, reward-model losses (those named in `losses`): Bradley-Terry and
    DeepSpeed-Chat's pairwise loss on a pairwise batch, the K-way ranking loss on a ranking
    batch."""
    rows = []
    if pairwise is not None and "bradley_terry" in losses:
        rows += objective_rows("3", f"rm bradley_terry [{label}]", critic,
                               obj.bradley_terry_objective, pairwise)
    if pairwise is not None and "dschat_pairwise" in losses:
        rows += objective_rows("3", f"rm dschat_pairwise [{label}]", critic,
                               obj.dschat_pairwise_objective, pairwise,
                               pad_token_id=pad_token_id,
                               num_padding_at_beginning=num_padding_at_beginning)
    if ranking is not None and "kway" in losses:
        k = ranking["input_ids"].shape[1]
        valid = np.arange(k)[None, :] < ranking["num_valid"][:, None]  # [N, K]
        rows += objective_rows("3", f"rm kway [{label}]", critic, obj.kway_objective, ranking,
                               aux_masks={"scores": valid})
    return rows


def all_terms_conventions(preset: str = "default") -> PPOConventions:
    """The preset with an entropy bonus and KL-as-loss switched on, so that one actor loss
    exercises every term `shared.ppo_losses` can add."""
    return dataclasses.replace(shared.get_preset(preset), entropy_coef=0.01, kl_in="loss",
                               kl_estimator="k3")


def rollout_for(
    actor: ModelPair,
    critic: ModelPair,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    answers: np.ndarray,
    response_mask: np.ndarray,
    *,
    conventions: PPOConventions,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A rollout batch (`batches.rollout_batch`) scored by the torch actor and critic."""
    import torch

    seq = np.concatenate([prompt_ids, answers], axis=1)
    attn = np.concatenate([prompt_mask, response_mask], axis=1)
    p = prompt_ids.shape[1]
    logits = torch.from_numpy(torch_forward(actor, seq, attn)[:, p - 1 : -1])
    logprobs = to_numpy(shared.token_logprobs(logits, torch.from_numpy(answers.astype(np.int64))))
    values = torch_forward(critic, seq, attn)[:, p - 1 : -1]
    return B.rollout_batch(prompt_ids, prompt_mask, answers, response_mask,
                           actor_logprobs=logprobs, critic_values=values,
                           conventions=conventions, seed=seed)


def ppo_rows(
    actor: ModelPair,
    critic: ModelPair,
    rollout: Mapping[str, np.ndarray],
    *,
    conventions: PPOConventions,
    ptx: Mapping[str, np.ndarray] | None = None,
    unsup_coef: float = 1.0,
    entropy: bool = True,
    label: str = "rollout",
) -> list[Row]:
    """Level 3, PPO: actor loss (with the conventions' entropy and KL terms), critic loss,
    the entropy bonus alone (`entropy`) and, given a text batch, the ptx loss; each with
    gradients."""
    rows = objective_rows("3", f"ppo actor [{label}]", actor, obj.ppo_actor_objective, rollout,
                          conventions=conventions)
    rows += objective_rows("3", f"ppo critic [{label}]", critic, obj.ppo_critic_objective,
                           rollout, conventions=conventions)
    if entropy:
        rows += objective_rows("3", f"entropy [{label}]", actor, obj.entropy_objective, rollout)
    if ptx is not None:
        rows += objective_rows("3", f"ptx [{label}]", actor, obj.ptx_objective, ptx,
                               unsup_coef=unsup_coef)
    return rows
