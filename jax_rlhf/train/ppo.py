"""Step 3: PPO of the actor against the reward model, with a critic and a frozen reference.

One iteration, as docs/architecture.md lays it out:

1. `generation_batches` prompt batches from a resumable `BatchIterator`;
2. `generate_experience`: uniforms from `shared.sampling_uniforms(seed, iteration, batch)`,
   the jitted sampler (`jax_rlhf.sampler`), the short-answer rule, then one jitted scoring
   pass: actor log-probs (training forward at the rollout weights), reference log-probs,
   critic values V(x, y_<t), reward-model end scores and `rollout_logprob_gap`;
3. `train_on_experience`: `shared.compute_advantages` over the whole buffer with the KL
   controller's current coefficient, then `ppo_epochs` passes over `shared.minibatch_schedule`
   mini-batches; `gradient_accumulation_steps` consecutive mini-batches form one optimiser
   step of actor and critic (`shared.ppo_losses` with the step's global token count), with the
   ptx loss added (`ptx_mode: joint`) or as an extra actor step (`separate`), and the EMA
   updated after every actor step;
4. KL controller update, metrics, checkpoint.

Actor and reference start from the SFT model, critic and reward model from the reward model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import shared
from jax_rlhf import sharding
from jax_rlhf.checkpoint import Checkpointer
from jax_rlhf.models import CausalLM
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef, Params, to_host
from jax_rlhf.sampler import SamplingParams, generate
from jax_rlhf.train.common import (
    RunContext,
    build_model,
    compute_dtype,
    configure_module,
    eos_ids,
    export_hf,
    heldout_metrics,
    host_metrics,
    load_eval_prompts,
    model_meta,
    trainable_filter,
)
from jax_rlhf.train.reward import end_scores
from jax_rlhf.train.step import (
    TrainState,
    abstract_train_state,
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    stack_micro_batches,
)
from shared.data import BatchIterator, PromptBatch, build_ptx_data, build_step_data
from shared.runlog import PhaseTimer, progress

logger = logging.getLogger(__name__)

ROLLOUT_PATH = "jax_sampler"
"""`rollout_path` metric: rollouts always come from the jitted sampler of `jax_rlhf.sampler`."""

LAST_STEP_METRICS = ("actor_lr", "critic_lr")
"""Metrics reported from the iteration's last optimiser step (the learning rate it used; with
`ptx_mode: separate` the actor's last step is the ptx step); every other training statistic
is the mean over the iteration's optimiser steps of each step's value."""

EXPERIENCE_FIELDS = (
    "prompt_ids", "prompt_mask", "response_ids", "sample_mask", "response_mask", "logprobs",
    "ref_logprobs", "values", "scores",
)
"""Per-row arrays of an experience that the training step reads (sample_mask: 1 up to and
including EOS, the attention of the answer; response_mask: the loss mask, after the
short-answer rule)."""


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
    critic: ModelDef
    reference: ModelDef
    reward: ModelDef
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


@functools.partial(jax.jit, static_argnums=0)
def _score(spec: PPOSpec, actor_params, actor_frozen, ref_params, critic_params, critic_frozen,
           reward_params, rollout):
    """Training-forward log-probs, reference log-probs, values and end scores of a rollout."""
    if spec.reference_on_host:
        ref_params = jax.device_put(ref_params, jax.memory.Space.Device)
    args = (rollout["prompt_ids"], rollout["prompt_mask"], rollout["response_ids"],
            rollout["sample_mask"])
    tokens = rollout["response_ids"]
    logits, _, _ = _response_forward(spec.actor.merge(actor_params, actor_frozen), *args)
    logprobs = shared.token_logprobs(logits.astype(jnp.float32), tokens)  # [B, N]
    ref_logits, _, _ = _response_forward(spec.reference.merge(ref_params), *args)
    ref_logprobs = shared.token_logprobs(ref_logits.astype(jnp.float32), tokens)
    values, _, _ = _response_forward(spec.critic.merge(critic_params, critic_frozen), *args)
    _, all_rewards, seq_mask = _response_forward(spec.reward.merge(reward_params), *args)
    scores = end_scores(all_rewards.astype(jnp.float32), seq_mask)  # [B]
    real = rollout["sample_mask"] > 0
    gap = jnp.max(jnp.where(real, jnp.abs(rollout["sample_logprobs"] - logprobs), 0.0))
    return {
        "logprobs": jnp.where(real, logprobs, 0.0),
        "ref_logprobs": jnp.where(real, ref_logprobs, 0.0),
        "values": values.astype(jnp.float32),
        "scores": scores,
        "rollout_logprob_gap": gap,
    }


@functools.partial(jax.jit, static_argnums=0)
def _advantages(conventions, exp, kl_coef):
    """`shared.compute_advantages` over the buffer, plus the rollout statistics."""
    mask = exp["response_mask"]
    out = shared.compute_advantages(
        exp["scores"], exp["logprobs"], exp["ref_logprobs"], exp["values"], mask,
        conventions=conventions, kl_coef=kl_coef,
    )
    # reward_score and the sequence KL (the KL controller's input) over the valid rows only
    # (answers not too short), 0 when there is none, as the torch backend.
    valid = ~exp["is_short"]
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    sequence_kl = jnp.sum(out["kl"] * mask, axis=-1)
    stats = {
        "reward_score": jnp.sum(jnp.where(valid, exp["scores"], 0.0)) / n_valid,
        "kl": jnp.sum(jnp.where(valid, sequence_kl, 0.0)) / n_valid,
        "advantages_mean": shared.masked_mean(out["advantages"], mask),
        "returns_mean": shared.masked_mean(out["returns"], mask),
    }
    return out["advantages"], out["returns"], stats


def _ptx_loss(actor, mb, normalizer):
    ids, mask = mb["ptx_input_ids"], mb["ptx_attention_mask"]
    logits, _ = actor(ids, mask)
    return shared.sft_loss(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:], mask[:, 1:],
        agg_mode="token-mean", normalizer=normalizer,
    )


def _ppo_step(spec: PPOSpec, actor_state: TrainState, critic_state: TrainState, batch, kl_coef):
    """One optimiser step of actor and critic on `[A, M, ...]` stacked mini-batches."""
    c = spec.conventions
    actor_opt = spec.actor_optimizer(actor_state.params)
    critic_opt = spec.critic_optimizer(critic_state.params)
    mask_all = batch["response_mask"]
    normalizer = shared.loss_normalizer(
        mask_all.reshape(-1, mask_all.shape[-1]), mode=c.loss_agg_mode
    )
    tokens_all = jnp.maximum(jnp.sum(mask_all), 1.0)
    joint_ptx = spec.ptx_mode == "joint"
    ptx_normalizer = (
        jnp.sum(batch["ptx_attention_mask"][..., 1:]).astype(jnp.float32) if joint_ptx else None
    )

    def loss_fn(params, mb):
        actor_params, critic_params = params
        args = (mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["sample_mask"])
        actor = spec.actor.merge(actor_params, actor_state.frozen)
        logits, _, _ = _response_forward(actor, *args)
        logits = logits.astype(jnp.float32)  # [M, N, V]
        logprobs = shared.token_logprobs(logits, mb["response_ids"])
        entropy = shared.entropy_from_logits(logits)
        critic = spec.critic.merge(critic_params, critic_state.frozen)
        values, _, _ = _response_forward(critic, *args)
        mask = mb["response_mask"]
        actor_loss, critic_loss, stats = shared.ppo_losses(
            logprobs, mb["logprobs"], mb["advantages"], values.astype(jnp.float32),
            mb["values"], mb["returns"], mask, conventions=c, entropy=entropy,
            ref_logprobs=mb["ref_logprobs"], kl_coef=kl_coef, normalizer=normalizer,
        )
        share = jnp.sum(mask) / tokens_all  # masked means of a micro-batch -> global means
        aux = {
            "pg_loss": stats["pg_loss"],
            "clip_fraction": stats["clip_fraction"] * share,
            "approx_kl": stats["approx_kl"] * share,
            "value_clip_fraction": stats["value_clip_fraction"] * share,
            "entropy": shared.masked_mean(entropy, mask) * share,
        }
        # actor_loss is logged without the ptx term (as DeepSpeed-Chat and the torch backend
        # log act_loss and unsuper_loss apart); the gradient is of the joint objective
        aux.update(actor_loss=actor_loss, critic_loss=critic_loss)
        if joint_ptx:
            aux["ptx_loss"] = _ptx_loss(actor, mb, ptx_normalizer)
            actor_loss = shared.ppo_ptx_objective(
                actor_loss, aux["ptx_loss"], unsup_coef=spec.unsup_coef
            )
        return actor_loss + critic_loss, aux

    grads, aux = accumulate_gradients(loss_fn, (actor_state.params, critic_state.params), batch)
    aux["actor_lr"] = actor_opt.schedule(actor_state.step)
    aux["critic_lr"] = critic_opt.schedule(critic_state.step)
    actor_state, aux["actor_grad_norm"] = apply_gradients(actor_state, grads[0], actor_opt.tx)
    critic_state, aux["critic_grad_norm"] = apply_gradients(
        critic_state, grads[1], critic_opt.tx
    )
    return actor_state, critic_state, aux


def _ptx_step(spec: PPOSpec, actor_state: TrainState, batch):
    """DeepSpeed-Chat's separate actor step on `unsup_coef * ptx_loss`."""
    actor_opt = spec.actor_optimizer(actor_state.params)
    normalizer = jnp.sum(batch["ptx_attention_mask"][..., 1:]).astype(jnp.float32)

    def loss_fn(params, mb):
        ptx_loss = _ptx_loss(spec.actor.merge(params, actor_state.frozen), mb, normalizer)
        return spec.unsup_coef * ptx_loss, {"ptx_loss": ptx_loss}

    grads, aux = accumulate_gradients(loss_fn, actor_state.params, batch)
    aux["actor_lr"] = actor_opt.schedule(actor_state.step)  # this step's learning rate
    actor_state, _ = apply_gradients(actor_state, grads, actor_opt.tx)
    return actor_state, aux


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _ema_update(beta: float, ema_params, params):
    """`shared.ema(beta).update` on the flat parameter dicts."""
    return shared.ema(beta=beta).update(shared.EmaState(ema_params), params).ema


class PPOTrainer:
    """PPO with actor, reference, critic and reward models on one mesh."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        actor_path: str | Path | None = None,
        critic_path: str | Path | None = None,
    ):
        cfg = ctx.config
        if cfg.model.retokenize_for_reward:
            raise NotImplementedError(
                "model.retokenize_for_reward: the JAX backend scores actor tokens with the "
                "reward model directly (one shared tokenizer)"
            )
        self.ctx, self.cfg, self.ppo = ctx, cfg, cfg.ppo
        self.conventions = cfg.ppo.conventions
        dtype = compute_dtype(cfg)
        actor_path = actor_path or cfg.model.actor_model_name_or_path
        critic_path = critic_path or cfg.model.critic_model_name_or_path

        # models: reference / reward are the initial actor / critic without adapters
        actor = build_model("causal_lm", path=actor_path, hf_config=cfg.model.actor_config,
                            seed=cfg.seed, dtype=dtype)
        self.ref_mdef, ref_params, _ = ModelDef.split(actor)
        adapted = configure_module(actor, self.ppo.actor, seed=cfg.seed)
        self.actor_mdef, actor_params, actor_frozen = ModelDef.split(
            actor, trainable=trainable_filter(self.ppo.actor, adapted)
        )
        critic = build_model("value_head", path=critic_path, hf_config=cfg.model.critic_config,
                             seed=cfg.seed + 1, dtype=dtype)
        self.reward_mdef, reward_params, _ = ModelDef.split(critic)
        adapted = configure_module(critic, self.ppo.critic, seed=cfg.seed + 1,
                                   lora_seed=cfg.seed)
        self.critic_mdef, critic_params, critic_frozen = ModelDef.split(
            critic, trainable=trainable_filter(self.ppo.critic, adapted)
        )
        mesh = ctx.mesh
        # copies: the actor/critic buffers are donated to their training steps
        ref_params, reward_params = jax.tree.map(jnp.copy, (ref_params, reward_params))
        self._ref_on_host = False
        self.ref_params = self._place_reference(ref_params)
        self.reward_params = sharding.shard_like(
            reward_params, sharding.param_shardings(reward_params, mesh)
        )

        # data
        data = build_step_data(cfg.data, ctx.tokenizer, "ppo")
        self.prompts = data.train
        dp = ctx.dp
        self.generation_rows = self.ppo.per_device_generation_batch_size * dp
        self.minibatch_rows = self.ppo.per_device_training_batch_size * dp
        self.generation_batches = self._generation_batches(dp)
        self.prompt_iterator = BatchIterator(
            self.prompts, self.generation_rows, seed=cfg.seed, shuffle=True, drop_last=True,
            name="ppo/prompts",
        )
        counts = shared.ppo_update_counts(
            num_prompts=len(self.prompts),
            world_size=dp,
            generation_batch_size=self.ppo.per_device_generation_batch_size,
            generation_batches=self.generation_batches,
            training_batch_size=self.ppo.per_device_training_batch_size,
            ppo_epochs=self.ppo.ppo_epochs,
            gradient_accumulation_steps=self.ppo.gradient_accumulation_steps,
            num_train_epochs=self.ppo.num_train_epochs,
            max_iterations=self.ppo.max_iterations,
        )
        self.total_iterations = counts.total_optimizer_steps // counts.optimizer_steps_per_iteration
        self.ptx_enabled = bool(self.ppo.unsup_coef > 0 and cfg.data.unsupervised_dataset_name)
        self.ptx_iterator = None
        if self.ptx_enabled:
            ptx = build_ptx_data(cfg.data, ctx.tokenizer).train
            ptx_rows = self.minibatch_rows * self.ppo.gradient_accumulation_steps
            self.ptx_iterator = BatchIterator(
                ptx, ptx_rows, seed=cfg.seed, shuffle=True, drop_last=len(ptx) >= ptx_rows,
                name="ppo/ptx",
            )
        ptx_mode = self.ppo.ptx_mode if self.ptx_enabled else None
        ptx_steps = 2 if ptx_mode == "separate" else 1

        # optimisers and states
        self.spec = PPOSpec(
            actor=self.actor_mdef, critic=self.critic_mdef, reference=self.ref_mdef,
            reward=self.reward_mdef, conventions=self.conventions,
            actor_optim=self.ppo.actor_optim, critic_optim=self.ppo.critic_optim,
            actor_total_steps=counts.total_optimizer_steps * ptx_steps,
            critic_total_steps=counts.total_optimizer_steps,
            actor_lora_lr=self.ppo.actor.lora.learning_rate,
            critic_lora_lr=self.ppo.critic.lora.learning_rate,
            unsup_coef=float(self.ppo.unsup_coef), ptx_mode=ptx_mode,
            reference_on_host=self._ref_on_host,
        )
        self.actor_state = init_train_state(
            actor_params, actor_frozen, self.spec.actor_optimizer(actor_params).tx, mesh
        )
        self.critic_state = init_train_state(
            critic_params, critic_frozen, self.spec.critic_optimizer(critic_params).tx, mesh
        )
        self.ema_params = (
            jax.tree.map(jnp.copy, self.actor_state.params) if self.ppo.enable_ema else None
        )
        self.kl_controller = shared.make_kl_controller(self.conventions)
        self.kl_state = self.kl_controller.init()
        self.iteration = 0
        self.history: list[dict] = []
        self._last_valid: dict | None = None

        self.sampling = SamplingParams.from_config(
            self.ppo.sampling,
            max_new_tokens=cfg.data.max_answer_seq_len,
            eos_ids=eos_ids(ctx.tokenizer, self.actor_mdef),
            pad_id=ctx.tokenizer.pad_token_id,
        )
        actor_sh = sharding.tree_shardings(self.actor_state)
        critic_sh = sharding.tree_shardings(self.critic_state)
        rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh, axis=1)
        self._ppo_step = jax.jit(
            _ppo_step,
            in_shardings=(actor_sh, critic_sh, batch_sh, rep),
            out_shardings=(actor_sh, critic_sh, rep),
            static_argnums=0,
            donate_argnums=(1, 2),
        )
        self._ptx_step = jax.jit(
            _ptx_step, in_shardings=(actor_sh, batch_sh), out_shardings=(actor_sh, rep),
            static_argnums=0, donate_argnums=(1,),
        )

    # -- setup helpers ----------------------------------------------------------------------
    def _generation_batches(self, dp: int) -> int:
        if self.ppo.num_rollout_samples is None:
            return self.ppo.generation_batches
        batches, rest = divmod(self.ppo.num_rollout_samples, self.generation_rows)
        if rest or batches < 1:
            raise ValueError(
                f"ppo.num_rollout_samples={self.ppo.num_rollout_samples} is not a multiple of "
                f"the generation batch {self.generation_rows} (per device x {dp})"
            )
        return batches

    def _place_reference(self, params: Params) -> Params:
        """The reference weights: in pinned host memory with `offload_reference_model` where
        the platform has it (each scoring pass streams them in), else like the actor's."""
        shardings = sharding.param_shardings(params, self.ctx.mesh)
        if self.ppo.offload_reference_model:
            if sharding.offload_supported():
                shardings = {k: s.with_memory_kind("pinned_host") for k, s in shardings.items()}
                self._ref_on_host = True
                logger.info("reference model kept in pinned host memory")
            else:
                logger.info("ppo.offload_reference_model: no-op on %s (no separate host "
                            "memory space to offload to)", jax.devices()[0].platform)
        return sharding.shard_like(params, shardings)

    # -- the algorithm ----------------------------------------------------------------------
    def generate_experience(
        self, prompts: PromptBatch, *, iteration: int | None = None, batch_index: int = 0,
        timer: PhaseTimer | None = None,
    ) -> dict[str, np.ndarray]:
        """Rollouts of one prompt batch, scored; host arrays `[B, ...]` plus stats.

        Fields: prompt_ids, prompt_mask, response_ids, response_mask (float, after the
        short-answer rule), sample_mask (as sampled), sample_logprobs, logprobs, ref_logprobs,
        values, scores, is_short, and the scalar rollout_logprob_gap.
        """
        iteration = self.iteration if iteration is None else iteration
        timer = timer or PhaseTimer()
        mesh, rows = self.ctx.mesh, len(prompts)
        uniforms = shared.sampling_uniforms(
            self.cfg.seed, iteration, batch_index, shape=(rows, self.sampling.max_new_tokens)
        )
        batch = sharding.shard_batch(
            {"ids": prompts.prompt_input_ids, "mask": prompts.prompt_attention_mask,
             "u": uniforms}, mesh,
        )
        with timer.phase("generation"):
            out = generate(self.actor_mdef, self.actor_state.params, self.actor_state.frozen,
                           batch["ids"], batch["mask"], batch["u"], self.sampling)
            out = jax.block_until_ready(out)
        with timer.phase("scoring"):
            rollout = {
                "prompt_ids": batch["ids"], "prompt_mask": batch["mask"],
                "response_ids": out.tokens, "sample_mask": out.response_mask,
                "sample_logprobs": out.logprobs,
            }
            scored = to_host(_score(
                self.spec, self.actor_state.params, self.actor_state.frozen, self.ref_params,
                self.critic_state.params, self.critic_state.frozen, self.reward_params, rollout,
            ))
        exp = {k: to_host(v) for k, v in rollout.items()}
        exp.update({k: v for k, v in scored.items() if k != "rollout_logprob_gap"})
        mask, is_short = shared.short_answer_mask(
            exp["sample_mask"], min_tokens=self.ppo.min_answer_tokens
        )
        exp["response_mask"], exp["is_short"] = mask.astype(np.float32), is_short
        exp["rollout_logprob_gap"] = float(scored["rollout_logprob_gap"])
        if self.ppo.short_answer_policy == "dschat":
            # Static shapes: too-short rows stay masked (as "mask"); a batch with none left
            # reuses the last valid rollout, as DeepSpeed-Chat does.
            if is_short.all() and self._last_valid is not None:
                logger.info("iteration %d: every answer too short; reusing the last rollout",
                            iteration)
                # the reused rows keep their own (valid) mask; the short answers generated
                # for this batch are still counted, as the torch backend does
                return {**self._last_valid, "short_answers": int(is_short.sum())}
            if not is_short.all():
                self._last_valid = exp
        return exp

    def train_on_experience(self, buffer: list[dict] | dict, *,
                            iteration: int | None = None) -> dict[str, Any]:
        """Advantages over the buffer, then `ppo_epochs` passes of mini-batch updates.

        Returns the iteration's metrics (rollout statistics over the valid rows, the mean of
        each training statistic over its optimiser steps, the last step's learning rates).
        """
        iteration = self.iteration if iteration is None else iteration
        if isinstance(buffer, dict):
            buffer = [buffer]
        exp = {k: np.concatenate([b[k] for b in buffer]) for k in (*EXPERIENCE_FIELDS, "is_short")}
        kl_coef = jnp.asarray(self.kl_state.kl_coef, jnp.float32)
        advantages, returns, stats = _advantages(
            self.conventions,
            {k: exp[k] for k in ("scores", "logprobs", "ref_logprobs", "values",
                                 "response_mask", "is_short")},
            kl_coef,
        )
        exp["advantages"], exp["returns"] = to_host(advantages), to_host(returns)
        metrics = host_metrics(stats)
        metrics.update(
            response_length=float(exp["sample_mask"].sum(-1).mean()),
            short_answers=sum(int(b.get("short_answers", np.sum(b["is_short"])))
                              for b in buffer),
            rollout_logprob_gap=max(b["rollout_logprob_gap"] for b in buffer),
            kl_coef=float(self.kl_state.kl_coef),
        )
        fields = (*EXPERIENCE_FIELDS, "advantages", "returns")
        accum = self.ppo.gradient_accumulation_steps
        schedule = shared.minibatch_schedule(
            len(exp["scores"]), self.minibatch_rows, ppo_epochs=self.ppo.ppo_epochs,
            shuffle=self.ppo.shuffle_minibatches, seed=self.cfg.seed, iteration=iteration,
        )
        step_stats = []
        for epoch in schedule:
            for start in range(0, len(epoch), accum):
                group = epoch[start : start + accum]
                rows = np.concatenate(group)
                arrays = {k: exp[k][rows] for k in fields}
                arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v
                          for k, v in arrays.items()}
                if self.ptx_enabled:
                    ptx = self.ptx_iterator.next_batch()
                    ptx = {"ptx_input_ids": ptx.input_ids, "ptx_attention_mask":
                           ptx.attention_mask}
                    ptx = _fit_rows(ptx, len(rows))
                    if self.ppo.ptx_mode == "joint":
                        arrays.update(ptx)
                batch = sharding.shard_batch(
                    stack_micro_batches(arrays, len(group)), self.ctx.mesh, axis=1
                )
                self.actor_state, self.critic_state, aux = self._ppo_step(
                    self.spec, self.actor_state, self.critic_state, batch, kl_coef
                )
                if self.ptx_enabled and self.ppo.ptx_mode == "separate":
                    ptx_batch = sharding.shard_batch(
                        stack_micro_batches(ptx, len(group)), self.ctx.mesh, axis=1
                    )
                    self.actor_state, ptx_aux = self._ptx_step(
                        self.spec, self.actor_state, ptx_batch
                    )
                    aux = {**aux, **ptx_aux}
                if self.ema_params is not None:
                    self.ema_params = _ema_update(
                        self.ppo.ema_beta, self.ema_params, self.actor_state.params
                    )
                step_stats.append(host_metrics(aux))
        for key in step_stats[0]:
            if key in LAST_STEP_METRICS:
                metrics[key] = float(step_stats[-1][key])
            else:
                metrics[key] = float(np.mean([s[key] for s in step_stats]))
        metrics.setdefault("ptx_loss", 0.0)
        return metrics

    def train_iteration(self) -> dict[str, Any]:
        """One PPO iteration (rollouts, training, KL controller update); returns metrics."""
        timer = PhaseTimer()
        buffer = []
        for b in range(self.generation_batches):
            prompts = self.prompt_iterator.next_batch()
            buffer.append(self.generate_experience(
                prompts, iteration=self.iteration, batch_index=b, timer=timer
            ))
            self._print_answers(prompts, buffer[-1])
        with timer.phase("training"):
            metrics = self.train_on_experience(buffer, iteration=self.iteration)
        rows = sum(int((~np.asarray(b["is_short"])).sum()) for b in buffer)  # valid rows
        self.kl_state = self.kl_controller.update(
            self.kl_state, current_kl=metrics["kl"], n_steps=rows
        )
        self.iteration += 1
        metrics.update(timer.pop(), rollout_path=ROLLOUT_PATH)
        self.history.append({"reward_score": metrics["reward_score"], "kl": metrics["kl"]})
        return metrics

    def _print_answers(self, prompts: PromptBatch, exp: dict) -> None:
        if not (self.ppo.print_answers and self.ctx.is_main
                and self.iteration % self.ppo.print_answers_interval == 0):
            return
        from shared.evaluation import decode_answers

        answers = decode_answers(self.ctx.tokenizer, exp["response_ids"], exp["sample_mask"])
        rows = zip(prompts.prompt_text, answers, exp["scores"], strict=True)
        for prompt, answer, score in list(rows)[:4]:
            print(f"[ppo {self.iteration}] {prompt!r} -> {answer!r} (reward {score:.3f})")

    # -- checkpoints ------------------------------------------------------------------------
    def _state_tree(self) -> dict:
        tree = {"actor": self.actor_state, "critic": self.critic_state}
        if self.ema_params is not None:
            tree["ema"] = self.ema_params
        return tree

    def checkpoint_meta(self) -> dict:
        return {
            "iteration": self.iteration,
            "prompt_iterator": self.prompt_iterator.state_dict(),
            "ptx_iterator": None if self.ptx_iterator is None else self.ptx_iterator.state_dict(),
            "kl_coef": float(self.kl_state.kl_coef),
            "history": self.history,
            "models": {
                "actor": model_meta(self.actor_mdef, self.ppo.actor),
                "critic": model_meta(self.critic_mdef, self.ppo.critic),
            },
        }

    def save(self, checkpointer: Checkpointer) -> None:
        checkpointer.save(self.iteration, self._state_tree(), self.checkpoint_meta())

    def restore(self, checkpointer: Checkpointer) -> bool:
        if checkpointer.latest_step() is None:
            return False
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self._state_tree(),
        )
        abstract["actor"] = abstract_train_state(self.actor_state)
        abstract["critic"] = abstract_train_state(self.critic_state)
        tree, meta = checkpointer.restore(abstract)
        self.actor_state, self.critic_state = tree["actor"], tree["critic"]
        self.ema_params = tree.get("ema")
        self.iteration = int(meta["iteration"])
        self.prompt_iterator.load_state_dict(meta["prompt_iterator"])
        if self.ptx_iterator is not None and meta["ptx_iterator"] is not None:
            self.ptx_iterator.load_state_dict(meta["ptx_iterator"])
        self.kl_state = shared.KLControllerState(kl_coef=float(meta["kl_coef"]))
        self.history = list(meta["history"])
        return True

    # -- the step ---------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict:
        """All iterations, the held-out metric, exports; returns the summary entry."""
        ctx, log_cfg = self.ctx, self.cfg.logging
        start = time.perf_counter()
        checkpointer = Checkpointer(
            ctx.step_dir("ppo") / "checkpoints", keep=log_cfg.keep_checkpoints,
            async_save=self.cfg.engine.jax.async_checkpointing,
        )
        if resume and self.restore(checkpointer):
            logger.info("ppo: resumed at iteration %d of %d", self.iteration,
                        self.total_iterations)
        bar = progress(self.total_iterations, desc="ppo", initial=self.iteration,
                       enabled=log_cfg.progress_bar and ctx.is_main)
        totals: dict[str, float] = {}
        try:
            while self.iteration < self.total_iterations:
                metrics = self.train_iteration()
                for key in ("generation_time", "scoring_time", "training_time"):
                    totals[key] = totals.get(key, 0.0) + metrics.get(key, 0.0)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_score']:.3f}",
                                kl=f"{metrics['kl']:.3f}")
                if (self.iteration % log_cfg.log_interval == 0
                        or self.iteration == self.total_iterations):
                    ctx.logger.log("ppo", self.iteration, metrics)
                if log_cfg.save_interval and self.iteration % log_cfg.save_interval == 0:
                    self.save(checkpointer)
            self.save(checkpointer)
        finally:
            bar.close()
            checkpointer.close()
        train_time = time.perf_counter() - start
        step_dir = ctx.step_dir("ppo")
        final_dir = export_hf(self.actor_mdef, self.actor_state.params, self.actor_state.frozen,
                              step_dir / "final", ctx.tokenizer)
        export_hf(self.critic_mdef, self.critic_state.params, self.critic_state.frozen,
                  step_dir / "critic_final", ctx.tokenizer)
        if self.ema_params is not None:
            export_hf(self.actor_mdef, self.ema_params, self.actor_state.frozen,
                      step_dir / "ema_final", ctx.tokenizer)
        heldout = heldout_metrics(ctx, self.actor_mdef, self.actor_state.params,
                                  self.actor_state.frozen, load_eval_prompts(ctx))
        last = self.history[-1] if self.history else {}
        return {
            "heldout": heldout,
            "final_reward": last.get("reward_score"),
            "final_kl": last.get("kl"),
            "iterations": self.iteration,
            "final_model": str(final_dir),
            "timings": {"train": train_time, **totals,
                        "total": time.perf_counter() - start},
        }


def _fit_rows(arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Cycles the rows of a ptx batch to exactly `rows` (only when the whole ptx set is smaller
    than one batch): the step's shapes must not change."""
    n = len(next(iter(arrays.values())))
    index = np.arange(rows) % n
    return {k: v[index] for k, v in arrays.items()}
