"""Training workloads on the JAX backend: the SFT step and the PPO iteration.

Both run the framework's own trainers (``jax_rlhf.train.SFTTrainer.train_step``,
``jax_rlhf.train.PPOTrainer.generate_experience`` / ``train_on_experience``) on the benchmark's
synthetic batches. After the trainer's figures (and its peak memory) are taken, the same
weights run a *plain* jitted step: the NNX model's forward, the minimal loss,
``jax.value_and_grad`` and ``optax.adamw`` — no clipping, no schedules, no shared losses, no
host round trips. The difference is the framework's overhead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bench.timing import (
    alternating_ppo_iterations,
    memory_snapshot,
    time_calls,
    timed_ppo_iterations,
)
from bench.workspace import Shapes, prompt_batch, sft_batch

__all__ = ["ppo_iteration", "sft_step"]


def _context(config: Any, run_dir: Path):
    from jax_rlhf.sharding import make_mesh
    from jax_rlhf.train.common import RunContext, load_tokenizer
    from shared.runlog import RunLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(config, run_dir, RunLogger(run_dir, enable_tensorboard=False),
                      make_mesh(config.engine.jax.mesh), load_tokenizer(config))


def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    # logit of the token minus logsumexp: no [B, T, V] log-softmax is materialised.
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def sft_step(config: Any, run_dir: Path, lm_dir: str, shapes: Shapes, *, vocab_size: int,
             warmup: int = 1, repeats: int = 3, budget_s: float | None = None) -> dict[str, Any]:
    """``SFTTrainer.train_step`` on [sft_batch, P + N], then the plain reference step."""
    calls = {"warmup": warmup, "repeats": repeats, "budget_s": budget_s}
    from jax_rlhf.train.sft import SFTTrainer

    ctx = _context(config, run_dir)
    trainer = SFTTrainer(config, run_dir=ctx.run_dir, model_name_or_path=lm_dir, ctx=ctx)
    loaded = memory_snapshot()
    batch = sft_batch(shapes.sft_batch, shapes, vocab_size)
    timing = time_calls(lambda: trainer.train_step(batch), label="train_step", **calls)
    out = {"framework": timing, **memory_snapshot(), "rss_after_load_bytes": loaded["rss_bytes"]}

    mdef, frozen = trainer.mdef, trainer.state.frozen
    tx = optax.adamw(1e-5)
    ids = jnp.asarray(batch.input_ids)
    mask = jnp.asarray(batch.attention_mask)
    loss_mask = jnp.asarray(batch.loss_mask[:, 1:], jnp.float32)

    def plain_step(params, opt_state, ids, mask, loss_mask):
        def loss_fn(params):
            logits, _ = mdef.merge(params, frozen)(ids, mask)
            nll = -_token_logprobs(logits[:, :-1], ids[:, 1:])
            return jnp.sum(nll * loss_mask) / jnp.sum(loss_mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    call = _carried(plain_step, trainer.state.params, tx, ids, mask, loss_mask)
    out["plain"] = time_calls(call, label="plain_step", **calls)
    return out


def _carried(step, params, tx, *batch):
    """A call of the jitted ``step(params, opt_state, *batch) -> (params, opt_state, loss)``
    that donates its state and carries it to the next call, as the trainers' steps do (a
    step that allocates fresh parameters and moments every call is slower than theirs).
    Starts from copies: the trainer's own buffers stay valid."""
    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    state = {"params": params, "opt_state": tx.init(params)}

    def call():
        state["params"], state["opt_state"], loss = step(state["params"], state["opt_state"],
                                                         *batch)
        return jax.block_until_ready(loss)

    call()  # the first call's outputs are laid out differently: the second compiles again
    return call


def ppo_iteration(config: Any, run_dir: Path, lm_dir: str, value_dir: str, shapes: Shapes, *,
                  vocab_size: int, warmup: int = 1, repeats: int = 2,
                  budget_s: float | None = None, plain: bool = True,
                  rollout_logprobs: bool = False) -> dict[str, Any]:
    """PPO iterations through ``PPOTrainer`` (generation and scoring phases from its
    ``PhaseTimer``, training timed around ``train_on_experience`` as ``train_iteration``
    does), then the plain scoring pass and plain actor + critic step."""
    from jax_rlhf.train.ppo import PPOTrainer

    ctx = _context(config, run_dir)
    trainer = PPOTrainer(config, run_dir=ctx.run_dir, actor_model_name_or_path=lm_dir,
                         critic_model_name_or_path=value_dir, ctx=ctx)
    # Full-length answers: an EOS id outside the vocabulary is never sampled.
    trainer.sampling = dataclasses.replace(trainer.sampling, eos_ids=(vocab_size,))
    loaded = memory_snapshot()
    prompts = prompt_batch(shapes.ppo_rollout_batch, shapes, vocab_size)
    # rollout_logprobs: the conventions.old_logprobs rollout row too, alternating with this one
    loop = alternating_ppo_iterations if rollout_logprobs else timed_ppo_iterations
    out, experience = loop(trainer, prompts, warmup=warmup, repeats=repeats,
                           budget_s=budget_s, rss_after_load=loaded["rss_bytes"])
    if plain:
        out["plain"] = _plain_ppo(trainer, experience, shapes, warmup=warmup, repeats=repeats,
                                  budget_s=budget_s)
    return out


def _plain_ppo(trainer, experience, shapes: Shapes, *, warmup: int, repeats: int,
               budget_s: float | None):
    calls = {"warmup": warmup, "repeats": repeats, "budget_s": budget_s}
    spec = trainer.spec
    actor_frozen, critic_frozen = trainer.actor_state.frozen, trainer.critic_state.frozen
    prompt_len = shapes.prompt_len
    seq = jnp.concatenate([jnp.asarray(experience.prompt_ids),
                           jnp.asarray(experience.response)], axis=1)  # [B, P + N]
    mask = jnp.ones_like(seq)
    response = jnp.asarray(experience.response)

    def response_logprobs(model, seq, mask, response):
        logits, _ = model(seq, mask)
        return _token_logprobs(logits[:, prompt_len - 1:-1], response)

    @jax.jit
    def score(actor_params, ref_params, critic_params, reward_params, seq, mask, response):
        return (response_logprobs(spec.actor.merge(actor_params, actor_frozen), seq, mask,
                                  response),
                response_logprobs(spec.reference.merge(ref_params), seq, mask, response),
                spec.critic.merge(critic_params, critic_frozen)(seq, mask)[0],
                spec.reward.merge(reward_params)(seq, mask)[0])

    weights = (trainer.actor_state.params, trainer.ref_params, trainer.critic_state.params,
               trainer.reward_params)
    scoring = time_calls(lambda: jax.block_until_ready(score(*weights, seq, mask, response)),
                         label="plain_scoring", **calls)

    rows = slice(0, shapes.ppo_minibatch)
    advantages = jnp.asarray(experience.values[rows])  # any [M, N] float array will do
    returns = jnp.asarray(experience.scores[rows])[:, None] + advantages
    tx = optax.adamw(1e-6)

    def step(params, opt_state, seq, mask, response, advantages, returns):
        def loss_fn(params):
            actor_params, critic_params = params
            logprobs = response_logprobs(spec.actor.merge(actor_params, actor_frozen), seq,
                                         mask, response)
            values = spec.critic.merge(critic_params, critic_frozen)(seq, mask)[0]
            values = values[:, prompt_len - 1:-1]
            return -jnp.mean(logprobs * advantages) + jnp.mean(jnp.square(values - returns))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    call = _carried(step, (trainer.actor_state.params, trainer.critic_state.params), tx,
                    seq[rows], mask[rows], response[rows], advantages, returns)
    training = time_calls(call, label="plain_step", **calls)
    return {"scoring": scoring, "step": training}
