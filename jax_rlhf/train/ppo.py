"""Step 3 in JAX: the JAX side of `shared.ppo_loop` (the same loop as the torch backend).

`shared.ppo_loop.PPOLoop` runs the iteration (data, uniforms, short-answer rule, advantages,
mini-batch / accumulation / ptx grouping, KL controller, metrics, resume, export layout,
summary); this file implements its model protocol with jitted functions on one mesh:

- `generate`: the jitted `while_loop` sampler (`jax_rlhf.sampler`), on a bf16 copy of the
  actor cast once per iteration with `ppo.rollout_dtype: bfloat16` (`jax_rlhf.rollout_weights`);
- `score`: one jitted pass of actor (training forward), reference, critic and reward model at
  the rollout weights;
- `train_step`: one jitted optimiser step of actor and critic over `[A, M, ...]` stacked
  micro-batches (`shared.ppo_losses` with the loop's per-micro-batch normalisers), joint ptx;
  `ptx_step`: DeepSpeed-Chat's separate ptx step; `update_ema`;
- orbax checkpoints, HF export, held-out evaluation.

Actor and reference start from the SFT model, critic and reward model from the reward model.

Python API (the same constructor as the torch backend)::

    trainer = PPOTrainer(config, run_dir="runs/x", actor_model_name_or_path="runs/x/sft/final",
                         critic_model_name_or_path="runs/x/reward/final")
    summary = trainer.run()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_rlhf import sharding
from jax_rlhf.checkpoint import DirectoryCheckpointer
from jax_rlhf.params import ModelDef, Params, to_host
from jax_rlhf.rollout_weights import RolloutWeights
from jax_rlhf.sampler import SamplingParams, generate
from jax_rlhf.train import engine
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
from jax_rlhf.train.engine import PPOSpec
from jax_rlhf.train.step import (
    abstract_train_state,
    init_train_state,
)
from shared.ppo_loop import PPOLoop

logger = logging.getLogger(__name__)

ROLLOUT_PATH = "jax_sampler"
"""`rollout_path` metric: rollouts always come from the jitted sampler of `jax_rlhf.sampler`."""

class PPOTrainer(PPOLoop):
    """PPO with actor, reference, critic and reward models on one mesh.

    Args:
      config: the run config.
      run_dir: the run directory; this step writes `<run_dir>/ppo/`.
      actor_model_name_or_path: the SFT model (actor and reference); default
        `model.actor_model_name_or_path` (or a fresh `actor_config` model).
      critic_model_name_or_path: the reward model (critic and reward); default
        `model.critic_model_name_or_path`, else a fresh `critic_config` model, else
        the actor's base model `model.actor_model_name_or_path`
        (`ModelConfig.reward_model_source`).
      ctx: an open `RunContext` of `run_dir` (mesh, tokenizer, logger); default built from
        the config.
    """

    backend = "jax"

    def __init__(self, config: Any, *, run_dir: str | Path,
                 actor_model_name_or_path: str | Path | None = None,
                 critic_model_name_or_path: str | Path | None = None,
                 ctx: RunContext | None = None):
        if (config.model.retokenize_for_reward and config.ppo.reward_model.url is None
                and config.ppo.reward_model_weight != 0):  # a served one re-encodes itself
            raise NotImplementedError(
                "model.retokenize_for_reward: the JAX backend scores actor tokens with the "
                "reward model directly (one shared tokenizer); serve the reward model "
                "(ppo.reward_model.url, `rlhf serve reward`) to score re-encoded text"
            )
        actor_path = actor_model_name_or_path or config.model.actor_model_name_or_path
        # ModelConfig.reward_model_source: a (None, critic_config) source builds it fresh
        critic_path = critic_model_name_or_path or config.model.reward_model_source()[0]
        self.start_models = {"actor": actor_path, "critic": critic_path}  # model cards
        ctx = ctx or RunContext.open(config, run_dir, fallback_tokenizer=actor_path)
        self.ctx, self.tokenizer, self.run_logger = ctx, ctx.tokenizer, ctx.logger
        self.is_main, self.rollout_path = ctx.is_main, ROLLOUT_PATH
        self._init_loop(config, run_dir, tokenizer=ctx.tokenizer, world_size=ctx.dp)
        ppo, dtype, mesh = config.ppo, compute_dtype(config), ctx.mesh

        # models: reference / reward are the initial actor / critic without adapters
        actor = build_model("causal_lm", path=actor_path, hf_config=config.model.actor_config,
                            seed=config.seed, dtype=dtype)
        self.ref_mdef, ref_params, _ = ModelDef.split(actor)
        adapted = configure_module(actor, ppo.actor, seed=config.seed)
        self.actor_mdef, actor_params, actor_frozen = ModelDef.split(
            actor, trainable=trainable_filter(ppo.actor, adapted)
        )
        # shared.critic_free.models_used (self.models): no critic for a critic-free
        # estimator, no reward model with ppo.reward_model_weight 0
        self.critic_mdef = self.reward_mdef = critic_params = critic_frozen = None
        reward_params = None
        if "critic" in self.models or "reward_model" in self.models:
            critic = build_model("value_head", path=critic_path,
                                 hf_config=config.model.critic_config, seed=config.seed + 1,
                                 dtype=dtype)
            self.reward_mdef, reward_params, _ = ModelDef.split(critic)
            if "reward_model" not in self.models:
                self.reward_mdef = reward_params = None
            if "critic" in self.models:
                adapted = configure_module(critic, ppo.critic, seed=config.seed + 1,
                                           lora_seed=config.seed)
                self.critic_mdef, critic_params, critic_frozen = ModelDef.split(
                    critic, trainable=trainable_filter(ppo.critic, adapted)
                )
        # copies: the actor/critic buffers are donated to their training steps
        if "reference" not in self.models:  # served (docs/serving.md): the loop asks it
            self.ref_mdef = ref_params = None
        ref_params, reward_params = jax.tree.map(jnp.copy, (ref_params, reward_params))
        self._ref_on_host = False
        self.ref_params = None if ref_params is None else self._place_reference(ref_params)
        self.reward_params = None if reward_params is None else sharding.shard_like(
            reward_params, sharding.param_shardings(reward_params, mesh)
        )
        self.spec = PPOSpec(
            actor=self.actor_mdef, critic=self.critic_mdef, reference=self.ref_mdef,
            reward=self.reward_mdef, conventions=self.conventions,
            actor_optim=ppo.actor_optim, critic_optim=ppo.critic_optim,
            actor_total_steps=self.actor_total_steps,
            critic_total_steps=self.critic_total_steps,
            actor_lora_lr=ppo.actor.lora.learning_rate,
            critic_lora_lr=ppo.critic.lora.learning_rate,
            unsup_coef=float(ppo.unsup_coef), ptx_mode=self.ptx_mode,
            reference_on_host=self._ref_on_host,
        )
        self.actor_state = init_train_state(
            actor_params, actor_frozen, self.spec.actor_optimizer(actor_params).tx, mesh
        )
        self.critic_state = None if self.critic_mdef is None else init_train_state(
            critic_params, critic_frozen, self.spec.critic_optimizer(critic_params).tx, mesh
        )
        self.ema_params = (
            jax.tree.map(jnp.copy, self.actor_state.params) if ppo.enable_ema else None
        )
        self.rollout_weights = RolloutWeights(self.actor_mdef, ppo.rollout_dtype)
        self.sampling = SamplingParams.from_config(
            ppo.sampling, max_new_tokens=config.data.max_answer_seq_len,
            eos_ids=eos_ids(ctx.tokenizer, self.actor_mdef), pad_id=ctx.tokenizer.pad_token_id,
        )
        actor_sh = sharding.tree_shardings(self.actor_state)
        critic_sh = (None if self.critic_state is None
                     else sharding.tree_shardings(self.critic_state))
        rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh, axis=1)
        self._ppo_step = jax.jit(
            engine.ppo_step, in_shardings=(actor_sh, critic_sh, batch_sh, rep),
            out_shardings=(actor_sh, critic_sh, rep), static_argnums=0, donate_argnums=(1, 2),
        )
        self._ptx_step = jax.jit(
            engine.ptx_step, in_shardings=(actor_sh, batch_sh), out_shardings=(actor_sh, rep),
            static_argnums=0, donate_argnums=(1,),
        )
        self._checkpointer = None

    def _place_reference(self, params: Params) -> Params:
        """The reference weights: in pinned host memory with `offload_reference_model` where
        the platform has it (each scoring pass streams them in), else like the actor's."""
        shardings = sharding.param_shardings(params, self.ctx.mesh)
        if self.config.ppo.offload_reference_model:
            if sharding.offload_supported():
                shardings = {k: s.with_memory_kind("pinned_host") for k, s in shardings.items()}
                self._ref_on_host = True
                logger.info("reference model kept in pinned host memory")
            else:
                logger.info("ppo.offload_reference_model: no-op on %s (no separate host "
                            "memory space to offload to)", jax.devices()[0].platform)
        return sharding.shard_like(params, shardings)

    # -- rollouts and scoring ---------------------------------------------------------------
    def generate(self, prompt_ids, prompt_mask, uniforms):
        batch = sharding.shard_batch({"ids": prompt_ids, "mask": prompt_mask, "u": uniforms},
                                     self.ctx.mesh)
        mdef, params, frozen = self.rollout_weights.get(self.actor_state)
        out = generate(mdef, params, frozen, batch["ids"], batch["mask"], batch["u"],
                       self.sampling)
        return to_host((out.tokens, out.response_mask, out.logprobs))

    def score(self, prompt_ids, prompt_mask, response, sample_mask, *, logprobs=True):
        rollout = sharding.shard_batch(
            {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response": response,
             "sample_mask": sample_mask.astype(np.int32)}, self.ctx.mesh,
        )
        critic = self.critic_state
        return to_host(engine.score(
            self.spec, self.actor_state.params, self.actor_state.frozen, self.ref_params,
            None if critic is None else critic.params, None if critic is None else critic.frozen,
            self.reward_params, rollout, actor_logprobs=logprobs,
        ))

    # -- training ---------------------------------------------------------------------------
    def _stacked(self, micro: list[dict[str, np.ndarray]], **per_micro) -> dict:
        """`[A, M, ...]` arrays, each micro-batch's normalisers broadcast over its rows."""
        out = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        rows = out[next(iter(out))].shape[1]
        for name, values in per_micro.items():
            out[name] = np.repeat(np.asarray(values, np.float32)[:, None], rows, axis=1)
        return sharding.shard_batch(out, self.ctx.mesh, axis=1)

    def train_step(self, micro_batches, *, normalizers, ptx, ptx_normalizers, kl_coef):
        extra = {"normalizer": normalizers}
        micro = micro_batches
        if ptx is not None:
            micro = [{**m, "ptx_input_ids": p["input_ids"],
                      "ptx_attention_mask": p["attention_mask"]}
                     for m, p in zip(micro_batches, ptx, strict=True)]
            extra["ptx_normalizer"] = ptx_normalizers
        self.actor_state, self.critic_state, aux = self._ppo_step(
            self.spec, self.actor_state, self.critic_state, self._stacked(micro, **extra),
            jnp.asarray(kl_coef, jnp.float32),
        )
        return host_metrics(aux)

    def ptx_step(self, ptx, *, ptx_normalizers):
        micro = [{"ptx_input_ids": p["input_ids"], "ptx_attention_mask": p["attention_mask"]}
                 for p in ptx]
        self.actor_state, aux = self._ptx_step(
            self.spec, self.actor_state, self._stacked(micro, ptx_normalizer=ptx_normalizers)
        )
        return host_metrics(aux)

    def update_ema(self) -> None:
        if self.ema_params is not None:
            self.ema_params = engine.ema_update(
                self.config.ppo.ema_beta, self.ema_params, self.actor_state.params
            )

    # -- checkpoints and export -------------------------------------------------------------
    @property
    def saves_in_background(self) -> bool:
        return self.config.engine.jax.async_checkpointing

    @property
    def checkpointer(self) -> DirectoryCheckpointer:
        if self._checkpointer is None:
            self._checkpointer = DirectoryCheckpointer(async_save=self.saves_in_background)
        return self._checkpointer

    def barrier(self) -> None:
        self.ctx.barrier()

    def wait_until_saved(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def _state_tree(self) -> dict:
        tree = {"actor": self.actor_state}
        if self.critic_state is not None:
            tree["critic"] = self.critic_state
        if self.ema_params is not None:
            tree["ema"] = self.ema_params
        return tree

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        models = {"actor": model_meta(self.actor_mdef, self.config.ppo.actor)}
        if self.critic_mdef is not None:
            models["critic"] = model_meta(self.critic_mdef, self.config.ppo.critic)
        meta = {**state, "models": models}
        self.checkpointer.save(path, self._state_tree(), meta)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self._state_tree(),
        )
        abstract["actor"] = abstract_train_state(self.actor_state)
        if self.critic_state is not None:
            abstract["critic"] = abstract_train_state(self.critic_state)
        tree, meta = self.checkpointer.restore(path, abstract)
        self.actor_state, self.critic_state = tree["actor"], tree.get("critic")
        self.ema_params = tree.get("ema")
        return meta

    def export(self, step_dir: Path) -> dict[str, str]:
        if self._checkpointer is not None:  # pending asynchronous saves finish first
            self._checkpointer.close()
            self._checkpointer = None
        state, tokenizer = self.actor_state, self.tokenizer
        paths = {"final_model": export_hf(self.actor_mdef, state.params, state.frozen,
                                          step_dir / "final", tokenizer)}
        if self.critic_state is not None:
            paths["critic_model"] = export_hf(self.critic_mdef, self.critic_state.params,
                                              self.critic_state.frozen, step_dir / "critic",
                                              tokenizer)
        if self.ema_params is not None:
            paths["ema_model"] = export_hf(self.actor_mdef, self.ema_params, state.frozen,
                                           step_dir / "ema", tokenizer)
        return {k: str(v) for k, v in paths.items()}

    def heldout_metrics(self, model: str) -> dict[str, float]:
        params = self.actor_state.params if model == "actor" else self.ema_params
        return heldout_metrics(self.ctx, self.actor_mdef, params, self.actor_state.frozen,
                               load_eval_prompts(self.ctx))
