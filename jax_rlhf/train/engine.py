"""The jitted PPO functions of the JAX backend (the counterpart of `torch_rlhf/engine.py`):
the static `PPOSpec` of the four models and their optimisers, and the scoring pass, the PPO
and ptx optimiser steps and the EMA update, each one `jax.jit` over the mesh.

`jax_rlhf.train.ppo.PPOTrainer` calls them from the protocol methods of `shared.ppo_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

import shared
from jax_rlhf.models import CausalLM
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef
from jax_rlhf.train.reward import end_scores
from jax_rlhf.train.step import TrainState, accumulate_gradients, apply_gradients

__all__ = ["PPOSpec", "critic_step", "ema_update", "ppo_step", "ptx_step", "score"]

TOKEN_SUMS = ("clip_fraction", "approx_kl", "value_clip_fraction")
"""Statistics returned per optimiser step as token-weighted sums (`shared.ppo_loop`)."""


def _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """Outputs of `model` at the positions that predict each answer token: `[B, N, ...]`,
    then every position's (`[B, P + N, ...]`, value models only; None for a causal LM, whose
    LM head runs on the answer positions alone) and the sequence mask."""
    prompt_len = prompt_ids.shape[1]
    seq = jnp.concatenate([prompt_ids, response_ids], axis=1)  # [B, P + N]
    mask = jnp.concatenate([prompt_mask, response_mask.astype(prompt_mask.dtype)], axis=1)
    answer = slice(prompt_len - 1, -1)
    if isinstance(model, CausalLM):
        logits, _ = model(seq, mask, logits_to_keep=answer)
        return logits, None, mask
    out, _ = model(seq, mask)
    return out[:, answer], out, mask


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    """Everything static the jitted PPO functions depend on (hashable: trainers built from
    equal configs share their compiled functions)."""

    actor: ModelDef
    critic: ModelDef | None
    """None in a critic-free run (`shared.critic_free.models_used`)."""
    reference: ModelDef | None
    """None when the initial policy is served (`ppo.initial_policy.url`)."""
    reward: ModelDef | None
    """None with `ppo.reward_model_weight` 0 (the loop's reward function alone)."""
    conventions: Any
    """The `PPOConventions`."""
    actor_optim: Any
    critic_optim: Any
    actor_total_steps: int
    critic_total_steps: int
    actor_lora_lr: float | None
    critic_lora_lr: float | None
    unsup_coef: float
    ptx_mode: str | None
    """"joint", "separate" or None (no ptx data or unsup_coef 0)."""
    reference_on_host: bool

    def actor_optimizer(self, params):
        return make_optimizer(self.actor_optim, params, total_steps=self.actor_total_steps,
                              lora_learning_rate=self.actor_lora_lr)

    def critic_optimizer(self, params):
        return make_optimizer(self.critic_optim, params, total_steps=self.critic_total_steps,
                              lora_learning_rate=self.critic_lora_lr)


@functools.partial(jax.jit, static_argnums=0, static_argnames="actor_logprobs")
def score(spec: PPOSpec, actor_params, actor_frozen, ref_params, critic_params, critic_frozen,
           reward_params, rollout, *, actor_logprobs: bool = True):
    """Training-forward log-probs, reference log-probs and values (every slot, unmasked) and
    end scores of a rollout; without `actor_logprobs` no actor forward (the loop trains on
    the sampler's log-probs, `shared.old_logprobs`)."""
    if spec.reference_on_host:
        ref_params = jax.device_put(ref_params, jax.memory.Space.Device)
    args = (rollout["prompt_ids"], rollout["prompt_mask"], rollout["response"],
            rollout["sample_mask"])
    tokens = rollout["response"]
    out = {}
    if actor_logprobs:
        logits, _, _ = _response_forward(spec.actor.merge(actor_params, actor_frozen), *args)
        out["logprobs"] = shared.token_logprobs(logits.astype(jnp.float32), tokens)  # [B, N]
    if spec.reference is not None:  # a served initial policy: the loop asks its server
        ref_logits, _, _ = _response_forward(spec.reference.merge(ref_params), *args)
        out["ref_logprobs"] = shared.token_logprobs(ref_logits.astype(jnp.float32), tokens)
    if spec.critic is not None:  # critic-free runs: the loop's zeros
        values, _, _ = _response_forward(spec.critic.merge(critic_params, critic_frozen), *args)
        out["values"] = values.astype(jnp.float32)
    if spec.reward is not None:  # a function-only reward: the loop's
        _, all_rewards, seq_mask = _response_forward(spec.reward.merge(reward_params), *args)
        out["scores"] = end_scores(all_rewards.astype(jnp.float32), seq_mask)  # [B]
    return out


def _ptx_loss(actor, mb, normalizer):
    ids, mask = mb["ptx_input_ids"], mb["ptx_attention_mask"]
    logits, _ = actor(ids, mask)
    return shared.sft_loss(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:], mask[:, 1:],
        agg_mode="token-mean", normalizer=normalizer,
    )


def critic_step(critic: ModelDef, conventions: Any, optimizer: Any, critic_state: TrainState,
                batch):
    """The critic's optimiser step on `[A, M, ...]` micro-batches (`prompt_ids`,
    `prompt_mask`, `response`, `sample_mask`, the rollout's `values`, `returns`,
    `response_mask`, `normalizer`): the critic half of `ppo_step`, and all of a served
    critic's `train_step` (`jax_rlhf.critic`). aux: critic_loss, value_clip_fraction (a
    token-weighted sum), critic_lr, critic_grad_norm."""

    def loss_fn(params, mb):
        args = (mb["prompt_ids"], mb["prompt_mask"], mb["response"], mb["sample_mask"])
        values, _, _ = _response_forward(critic.merge(params, critic_state.frozen), *args)
        mask = mb["response_mask"]
        loss, stats = shared.critic_loss(values.astype(jnp.float32), mb["values"],
                                         mb["returns"], mask, conventions=conventions,
                                         normalizer=jnp.max(mb["normalizer"]))
        return loss, {"critic_loss": loss,
                      "value_clip_fraction": stats["value_clip_fraction"] * jnp.sum(mask)}

    grads, aux = accumulate_gradients(loss_fn, critic_state.params, batch)
    aux["critic_lr"] = optimizer.schedule(critic_state.step)
    critic_state, aux["critic_grad_norm"] = apply_gradients(critic_state, grads, optimizer.tx)
    return critic_state, aux


def ppo_step(spec: PPOSpec, actor_state: TrainState, critic_state: TrainState, batch, kl_coef):
    """One optimiser step of actor and critic on `[A, M, ...]` stacked micro-batches; each
    row carries its micro-batch's loss normaliser (`normalizer`, `ptx_normalizer`). The
    critic's half is `critic_step` (what a served critic runs)."""
    c = spec.conventions
    actor_opt = spec.actor_optimizer(actor_state.params)
    has_critic = spec.critic is not None  # else critic_state is None (a critic-free run)
    joint_ptx = spec.ptx_mode == "joint"

    def loss_fn(actor_params, mb):
        args = (mb["prompt_ids"], mb["prompt_mask"], mb["response"], mb["sample_mask"])
        actor = spec.actor.merge(actor_params, actor_state.frozen)
        logits, _, _ = _response_forward(actor, *args)
        logits = logits.astype(jnp.float32)  # [M, N, V]
        logprobs = shared.token_logprobs(logits, mb["response"])
        entropy = shared.entropy_from_logits(logits)
        mask = mb["response_mask"]
        actor_loss, critic_loss, stats = shared.ppo_losses(
            logprobs, mb["logprobs"], mb["advantages"], None,
            mb["values"], mb["returns"], mask, conventions=c, entropy=entropy,
            ref_logprobs=mb["ref_logprobs"], kl_coef=kl_coef,
            normalizer=jnp.max(mb["normalizer"]),
            importance_weights=mb.get("importance_weights"),
        )
        tokens = jnp.sum(mask)
        aux = {k: stats[k] * tokens for k in TOKEN_SUMS}
        # actor_loss is logged without the ptx term (as DeepSpeed-Chat logs act_loss and
        # unsuper_loss apart); the gradient is of the joint objective
        aux.update(actor_loss=actor_loss, critic_loss=critic_loss, pg_loss=stats["pg_loss"],
                   tokens=tokens, entropy=jnp.sum(jax.lax.stop_gradient(entropy) * mask))
        if joint_ptx:
            aux["ptx_loss"] = _ptx_loss(actor, mb, jnp.max(mb["ptx_normalizer"]))
            actor_loss = shared.ppo_ptx_objective(
                actor_loss, aux["ptx_loss"], unsup_coef=spec.unsup_coef
            )
        return actor_loss, aux

    grads, aux = accumulate_gradients(loss_fn, actor_state.params, batch)
    aux["actor_lr"] = actor_opt.schedule(actor_state.step)
    actor_state, aux["actor_grad_norm"] = apply_gradients(actor_state, grads, actor_opt.tx)
    if has_critic:
        critic_state, critic_aux = critic_step(
            spec.critic, c, spec.critic_optimizer(critic_state.params), critic_state, batch)
        aux.update(critic_aux)
    return actor_state, critic_state, aux


def ptx_step(spec: PPOSpec, actor_state: TrainState, batch):
    """DeepSpeed-Chat's separate actor step on `unsup_coef * ptx_loss`."""
    actor_opt = spec.actor_optimizer(actor_state.params)

    def loss_fn(params, mb):
        ptx_loss = _ptx_loss(spec.actor.merge(params, actor_state.frozen), mb,
                             jnp.max(mb["ptx_normalizer"]))
        return spec.unsup_coef * ptx_loss, {"ptx_loss": ptx_loss}

    grads, aux = accumulate_gradients(loss_fn, actor_state.params, batch)
    aux["actor_lr"] = actor_opt.schedule(actor_state.step)  # this step's learning rate
    actor_state, _ = apply_gradients(actor_state, grads, actor_opt.tx)
    return actor_state, aux


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def ema_update(beta: float, ema_params, params):
    """`shared.ema(beta).update` on the flat parameter dicts."""
    return shared.ema(beta=beta).update(shared.EmaState(ema_params), params).ema


