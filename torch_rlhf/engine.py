"""The four models of PPO on DeepSpeed, as DeepSpeed-Chat's ``DeepSpeedRLHFEngine``.

- actor: the policy, a DeepSpeed *training* engine (ZeRO ``actor_zero_stage``, LoRA,
  gradient checkpointing, dropout switches), started from the SFT model; built as a
  Hybrid Engine when ``engine.torch.hybrid_engine`` picks it (CUDA only, see
  ``torch_rlhf.generation.select_rollout_path``);
- reference: the frozen SFT model, an inference engine (ZeRO-3 when the actor is, else a
  full copy per rank); with ``ppo.offload_reference_model`` its parameters live in host
  memory (ZeRO-3 parameter offload, or a plain module on the CPU below ZeRO-3);
- critic: a training engine started from the reward model (``critic_zero_stage``);
- reward: the frozen reward model, an inference engine (ZeRO-3 when the critic is).

With ``ppo.enable_ema`` the engine also keeps an exponential moving average of the
actor's weights with ``shared.ema`` (with LoRA, of the base weights and the A and B
matrices apart, merged on export, as DeepSpeed-Chat's moving_average over the parameters
of its LoRA EMA model and the JAX backend): the full weights are gathered under
ZeRO-3 (every rank takes part) and the average is kept in fp32 host memory on rank 0,
which checkpoints and saves it (``ppo/ema/``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from shared.config import RLHFConfig
from shared.console import FILE_ONLY
from shared.control import EmaState, ema
from shared.critic_free import models_used
from shared.data import prepare_tokenizer
from torch_rlhf.deepspeed_config import (
    HybridEngineUnavailable,
    initialize_engine,
    make_eval_ds_config,
    reference_zero_stage,
)
from torch_rlhf.distributed import is_main, world_size
from torch_rlhf.generation import select_rollout_path
from torch_rlhf.lora import merged_state_dict
from torch_rlhf.models import check_reward_tokenizer, load_tokenizer, torch_dtype, unwrap_model
from torch_rlhf.optim import build_train_engine, train_ds_config
from torch_rlhf.runtime import build_model
from torch_rlhf.saving import gather_params_for, save_hf_state_dict

__all__ = ["RLHFEngine"]

logger = logging.getLogger(__name__)


def _model_type(name_or_path: str | None, config_dict: Mapping[str, Any] | None,
                trust_remote_code: bool) -> str:
    if name_or_path is not None:
        return transformers.AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code).model_type
    return str((config_dict or {}).get("model_type", "unknown"))


class RLHFEngine:
    """Actor, reference, critic and reward models for PPO (plus the actor's EMA).

    Args:
      config: the run config (``ppo``, ``engine.torch``, ``model`` sections).
      actor_model_name_or_path: the SFT model (actor and reference); None builds a fresh
        one from ``model.actor_config`` (tests, smoke runs).
      critic_model_name_or_path: the reward model (critic and reward); None: fresh from
        ``model.critic_config``.
      tokenizer: the actor's tokenizer.
      actor_total_steps, critic_total_steps: optimiser steps of the run (LR schedules).

    Attributes:
      actor, critic: DeepSpeed training engines (``critic`` None when the run's advantage
        estimator needs none, ``shared.critic_free.models_used``).
      ref, reward: DeepSpeed inference engines (``ref`` may be a CPU module, see above;
        ``reward`` None with ``ppo.reward_model_weight`` 0).
      models: the models the run uses (``shared.critic_free.models_used``).
      rollout_path, rollout_reason: "hybrid_engine" or "module", and why.
      reward_tokenizer, reward_reads_actor_tokens: the reward model's tokenizer and
        whether it reads the actor's token ids as they are (else rollouts are decoded
        and re-encoded, ``model.retokenize_for_reward``).
    """

    def __init__(self, config: RLHFConfig, *, actor_model_name_or_path: str | None,
                 critic_model_name_or_path: str | None, tokenizer, actor_total_steps: int,
                 critic_total_steps: int):
        self.config = config
        self.tokenizer = tokenizer
        ppo, tp, model_cfg = config.ppo, config.engine.torch, config.model
        self.actor_source = (actor_model_name_or_path, model_cfg.actor_config)
        self.critic_source = (critic_model_name_or_path, model_cfg.critic_config)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        model_type = _model_type(actor_model_name_or_path, model_cfg.actor_config,
                                 model_cfg.trust_remote_code)
        # `on` where the Hybrid Engine cannot run raises here, before any model is built.
        self.rollout_path, self.rollout_reason = select_rollout_path(
            tp.hybrid_engine, device_type=device_type, model_type=model_type)
        # shared.critic_free.models_used: no critic for a critic-free estimator, no reward
        # model with ppo.reward_model_weight 0, neither reference nor reward model when
        # served (docs/serving.md)
        self.models = models_used(config)
        self.actor = self._init_actor(actor_total_steps)
        self.ref = self._init_ref() if "reference" in self.models else None
        self.critic = (self._init_critic(critic_total_steps) if "critic" in self.models
                       else None)
        self.reward = self._init_reward() if "reward_model" in self.models else None
        self.reward_tokenizer = tokenizer
        if model_cfg.reward_tokenizer_name_or_path and self.reward is not None:
            self.reward_tokenizer = prepare_tokenizer(load_tokenizer(
                model_cfg.reward_tokenizer_name_or_path,
                trust_remote_code=model_cfg.trust_remote_code),
                pad_with_eos=config.data.pad_with_eos)
        self.reward_reads_actor_tokens = self.reward is None or check_reward_tokenizer(
            tokenizer, self.reward_tokenizer,
            retokenize_for_reward=model_cfg.retokenize_for_reward)
        self.ema = ema(beta=ppo.ema_beta) if ppo.enable_ema else None
        self.ema_state: EmaState | None = None
        if self.ema is not None:
            weights = self.actor_weights()
            self.ema_state = self.ema.init(weights) if weights is not None else None
        critic = (f"ZeRO-{tp.critic_zero_stage}" if self.critic is not None
                  else "served" if any(m.startswith("critic@") for m in self.models)
                  else "none")
        logger.info("RLHF engine: actor ZeRO-%d, critic %s, reference %s, rollouts via %s",
                    tp.actor_zero_stage, critic,
                    ("served" if self.ref is None else "in host memory"
                     if ppo.offload_reference_model else "beside the actor"),
                    self.rollout_path)
        logger.info("rollouts via %s: %s", self.rollout_path, self.rollout_reason,
                    extra=FILE_ONLY)  # the long why: in the run log

    # ----------------------------------------------------------------- the four models

    def _actor_ds_config(self, hybrid: bool) -> dict[str, Any]:
        ppo, tp, data = self.config.ppo, self.config.engine.torch, self.config.data
        hybrid_kwargs = None
        if hybrid:
            hybrid_kwargs = dict(
                enable_hybrid_engine=True, inference_tp_size=tp.inference_tp_size,
                release_inference_cache=tp.release_inference_cache,
                pin_parameters=not tp.unpin_actor_parameters,
                tp_gather_partition_size=tp.tp_gather_partition_size,
                max_out_tokens=data.max_prompt_seq_len + data.max_answer_seq_len)
        return train_ds_config(optim=ppo.actor_optim, stage=tp.actor_zero_stage,
                               offload=tp.offload, dtype=self.config.model.dtype,
                               micro_batch_size=ppo.per_device_training_batch_size,
                               gradient_accumulation_steps=ppo.gradient_accumulation_steps,
                               hybrid_engine=hybrid_kwargs)

    def _build_actor_engine(self, total_steps: int, *, hybrid: bool):
        ds_config = self._actor_ds_config(hybrid)
        path, config_dict = self.actor_source
        model = build_model("causal_lm", self.config, self.tokenizer, name_or_path=path,
                            config_dict=config_dict, module=self.config.ppo.actor,
                            ds_config=ds_config)
        return build_train_engine(model, ds_config=ds_config, optim=self.config.ppo.actor_optim,
                                  lora=self.config.ppo.actor.lora, total_steps=total_steps)

    def _init_actor(self, total_steps: int):
        hybrid = self.rollout_path == "hybrid_engine"
        try:
            actor = self._build_actor_engine(total_steps, hybrid=hybrid)
        except HybridEngineUnavailable as err:
            if self.config.engine.torch.hybrid_engine == "on":
                raise
            logger.warning("the Hybrid Engine did not build (%s); generating through the "
                           "module", err)
            self.rollout_path, self.rollout_reason = "module", f"Hybrid Engine unavailable: {err}"
            actor = self._build_actor_engine(total_steps, hybrid=False)
        if self.config.engine.torch.enable_mixed_precision_lora:
            self._mixed_precision_lora(actor)
        return actor

    def _mixed_precision_lora(self, actor) -> None:
        # DS-Chat: keep the frozen base weights quantised beside fp16/bf16 LoRA adapters;
        # DeepSpeed only offers this for ZeRO-3 on an accelerator.
        cfg = self.config
        reasons = []
        if cfg.ppo.actor.lora.dim == 0:
            reasons.append("ppo.actor.lora.dim > 0")
        if cfg.engine.torch.actor_zero_stage != 3:
            reasons.append("engine.torch.actor_zero_stage: 3")
        if cfg.model.dtype == "fp32":
            reasons.append("model.dtype: bf16 or fp16")
        if not torch.cuda.is_available():
            reasons.append("a CUDA device")
        if reasons:
            raise ValueError("engine.torch.enable_mixed_precision_lora needs "
                             + ", ".join(reasons))
        actor.optimizer.quantize_nontrainable_params()

    def _frozen(self, kind: str, source, *, stage: int, offload: bool):
        ds_config = make_eval_ds_config(
            stage=stage, offload=offload, dtype=self.config.model.dtype,
            train_micro_batch_size_per_gpu=self.config.ppo.per_device_training_batch_size,
            world_size=world_size())
        path, config_dict = source
        model = build_model(kind, self.config, self.tokenizer, name_or_path=path,
                            config_dict=config_dict, ds_config=ds_config, trainable=False)
        if offload and stage != 3:
            return model.to("cpu")  # host memory; forwards run on the CPU
        return initialize_engine(model, config=ds_config)

    def _init_ref(self):
        stage = reference_zero_stage(self.config.engine.torch.actor_zero_stage)
        return self._frozen("causal_lm", self.actor_source, stage=stage,
                            offload=self.config.ppo.offload_reference_model)

    def _init_critic(self, total_steps: int):
        # torch_rlhf.critic: the same builder as a served critic's (rlhf serve critic)
        from torch_rlhf.critic import build_critic_engine

        path, config_dict = self.critic_source
        return build_critic_engine(self.config, self.tokenizer, name_or_path=path,
                                   config_dict=config_dict, total_steps=total_steps)

    def _init_reward(self):
        stage = reference_zero_stage(self.config.engine.torch.critic_zero_stage)
        return self._frozen("value", self.critic_source, stage=stage, offload=False)

    # ----------------------------------------------------------------- modes

    def train(self) -> None:
        """Training mode for the actor and critic (the frozen models stay in eval mode)."""
        self.actor.train()
        if self.critic is not None:
            self.critic.train()

    def eval(self) -> None:
        for model in self.modules.values():
            model.eval()

    # ----------------------------------------------------------------- EMA

    def actor_weights(self) -> dict[str, torch.Tensor] | None:
        """The actor's floating-point weights (``state_dict`` names: with LoRA, the base
        weights and the adapters apart) as fp32 CPU copies, on rank 0 (None elsewhere).
        Every rank must call this under ZeRO-3."""
        module = unwrap_model(self.actor)
        with gather_params_for(module):
            if not is_main():
                return None
            state = module.state_dict()
            return {k: v.detach().float().cpu().clone() for k, v in state.items()
                    if v.is_floating_point()}

    def ema_weights(self) -> dict[str, torch.Tensor]:
        """The EMA weights under HF names, LoRA merged (W + scaling * EMA(B) @ EMA(A)); empty
        off rank 0 or without EMA."""
        if self.ema_state is None:
            return {}
        return merged_state_dict(unwrap_model(self.actor), dict(self.ema_state.ema))

    def update_ema(self) -> None:
        """``ema <- beta * ema + (1 - beta) * actor`` (shared.ema); no-op without EMA."""
        if self.ema is None:
            return
        weights = self.actor_weights()
        if weights is not None and self.ema_state is not None:
            self.ema_state = self.ema.update(self.ema_state, weights)

    def save_ema(self, out_dir: str) -> None:
        """Write the EMA weights as a Hugging Face directory (every rank must call this)."""
        if self.ema is None:
            return
        state = self.ema_weights()
        save_hf_state_dict(self.actor, state, self.tokenizer, out_dir,
                           dtype=torch_dtype(self.config.model.dtype))

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The models this run built (``critic`` and ``reward`` only where it uses them)."""
        modules = {"actor": self.actor, "ref": self.ref, "critic": self.critic,
                   "reward": self.reward}
        return {k: v for k, v in modules.items() if v is not None}
