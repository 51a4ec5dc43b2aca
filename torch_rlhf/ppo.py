"""Step 3 on DeepSpeed: the torch side of ``shared.ppo_loop`` (DS-Chat ``DeepSpeedPPOTrainer``).

``shared.ppo_loop.PPOLoop`` runs the iteration (data, uniforms, short-answer rule,
advantages, mini-batch / accumulation / ptx grouping, KL controller, metrics, resume,
export layout, summary); this file implements its model protocol on the four models of
:class:`~torch_rlhf.engine.RLHFEngine`:

- ``generate``: each rank samples its slice of the rows with the parity sampler
  (``torch_rlhf.generation.generate_rollout``; Hybrid Engine or module path, recorded as
  ``rollout_path``); the rows are all-gathered;
- ``score``: actor (training forward), reference, critic and reward forwards of this rank's
  rows at the rollout weights, gathered;
- ``train_step`` / ``ptx_step``: DeepSpeed backward/step per micro-batch on this rank's rows,
  losses from ``shared.ppo_losses`` with the loop's global normalisers;
- EMA, checkpoints (``torch_rlhf.checkpoint``), HF export, held-out evaluation.

Python API (the same constructor as the JAX backend)::

    trainer = PPOTrainer(config, run_dir="runs/x", actor_model_name_or_path="runs/x/sft/final",
                         critic_model_name_or_path="runs/x/reward/final")
    summary = trainer.run()
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.data import StepData
from shared.logprobs import entropy_from_logits, token_logprobs
from shared.ppo_loop import PPOLoop
from shared.ppo_step import ppo_losses
from shared.reward_text import reward_texts
from shared.runlog import RunLogger
from shared.sft_loss import sft_loss
from torch_rlhf.checkpoint import CheckpointManager
from torch_rlhf.critic import critic_micro_step, critic_values
from torch_rlhf.distributed import (
    all_gather_rows,
    all_reduce_sum,
    barrier,
    is_main,
    rank_rows,
    world_size,
)
from torch_rlhf.engine import RLHFEngine
from torch_rlhf.evaluation import eos_token_id, heldout_metrics
from torch_rlhf.generation import generate_rollout
from torch_rlhf.models import (
    build_causal_lm,
    causal_lm_logits,
    gather_end_values,
    text_end_scores,
)
from torch_rlhf.optim import backward, current_lr, optimizer_step
from torch_rlhf.rollout_weights import RolloutModule
from torch_rlhf.runtime import lora_settings, open_run_logger, resolve_tokenizer
from torch_rlhf.saving import save_hf

__all__ = ["PPOTrainer"]

logger = logging.getLogger(__name__)


class PPOTrainer(PPOLoop):
    """PPO with ``config.ppo`` on an :class:`RLHFEngine`.

    Args:
      config: the run config.
      run_dir: the run directory; this step writes ``<run_dir>/ppo/``.
      actor_model_name_or_path: the SFT model (actor and reference); default
        ``model.actor_model_name_or_path`` (or a fresh ``actor_config`` model).
      critic_model_name_or_path: the reward model (critic and reward); default
        ``model.critic_model_name_or_path``, else a fresh ``critic_config`` model, else
        the actor's base model ``model.actor_model_name_or_path``
        (``ModelConfig.reward_model_source``).
      tokenizer, run_logger: defaults built from the config.
      engine: an already built RLHFEngine (its LR schedules must fit this run).
    """

    backend = "torch"

    def __init__(self, config: RLHFConfig, *, run_dir: str | Path,
                 actor_model_name_or_path: str | None = None,
                 critic_model_name_or_path: str | None = None, tokenizer=None,
                 run_logger: RunLogger | None = None, engine: RLHFEngine | None = None,
                 data: StepData | None = None):
        ppo = config.ppo
        actor_path = actor_model_name_or_path or config.model.actor_model_name_or_path
        # ModelConfig.reward_model_source: a (None, critic_config) source builds it fresh
        critic_path = critic_model_name_or_path or config.model.reward_model_source()[0]
        self.start_models = {"actor": actor_path, "critic": critic_path}  # model cards
        self.tokenizer = tokenizer or resolve_tokenizer(config, actor_path)
        self.is_main = is_main()
        self._init_loop(config, run_dir, tokenizer=self.tokenizer, world_size=world_size())
        if data is not None:
            self.data = data
        self.run_logger = run_logger or open_run_logger(config, run_dir)
        if ppo.align_overflow:
            if config.model.dtype == "fp16":
                raise NotImplementedError(
                    "ppo.align_overflow (skip both optimiser steps when either overflows in "
                    "fp16) is not implemented by the torch backend; use model.dtype: bf16 or "
                    "set ppo.align_overflow: false")
            logger.warning("ppo.align_overflow only concerns fp16 loss scaling; ignored for %s",
                           config.model.dtype)
        self.eos_token_id = eos_token_id(config, self.tokenizer)
        self.engine = engine or RLHFEngine(
            config, actor_model_name_or_path=actor_path,
            critic_model_name_or_path=critic_path, tokenizer=self.tokenizer,
            actor_total_steps=self.actor_total_steps, critic_total_steps=self.critic_total_steps)
        self.rollout_path = self.engine.rollout_path
        # ppo.rollout_dtype: a bf16 copy of the actor, re-cast after each training step
        self.rollout_module = RolloutModule(ppo.rollout_dtype)
        self.device = self.engine.actor.device
        # DeepSpeed engine states in the loop's checkpoint directories
        self.checkpoint_files = CheckpointManager(self.step_dir / "checkpoints",
                                                  keep=config.logging.keep_checkpoints)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    # ------------------------------------------------------------ rollouts and scoring

    def generate(self, prompt_ids, prompt_mask, uniforms):
        mine = rank_rows(len(prompt_ids))
        sampling = self.config.ppo.sampling
        actor = self.rollout_module.get(self.engine.actor)  # a bf16 copy for rollout_dtype
        output, self.rollout_path = generate_rollout(
            actor, self._tensor(prompt_ids[mine]), self._tensor(prompt_mask[mine]),
            hybrid_engine=self.config.engine.torch.hybrid_engine,
            rollout_decode=self.config.engine.torch.rollout_decode,
            max_new_tokens=self.config.data.max_answer_seq_len, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, uniforms=uniforms[mine],
            do_sample=sampling.do_sample, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p)
        return tuple(all_gather_rows(t).cpu().numpy() for t in
                     (output.response, output.response_mask, output.logprobs.float()))

    def _response_logits(self, model, sequences, attention_mask, prompt_length: int):
        # logits[:, P - 1 + t] predicts answer token t: [B, N, V], upcast for the losses;
        # only those N positions go through the LM head.
        device = next(iter(model.parameters())).device
        logits = causal_lm_logits(model, sequences.to(device), attention_mask.to(device),
                                  positions=slice(prompt_length - 1, -1))
        return logits.float().to(self.device)

    @staticmethod
    def _values(model, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
        return critic_values(model, sequences, attention_mask, prompt_length)

    def _sequences(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.concatenate([batch["prompt_ids"], batch["response"]], 1)
        mask = np.concatenate([batch["prompt_mask"], batch["sample_mask"].astype(np.int64)], 1)
        return self._tensor(ids).long(), self._tensor(mask).long()

    def _reward_scores(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        sequences, attention_mask = self._sequences(batch)
        prompt_length = batch["prompt_ids"].shape[1]
        if self.engine.reward_reads_actor_tokens:
            values = self.engine.reward(sequences, attention_mask).float()
            return gather_end_values(values, attention_mask, prompt_length=prompt_length)
        # Different vocabularies: decode the actor's tokens, re-encode for the reward model
        # (shared.reward_text; a served reward model re-encodes the same text).
        texts = reward_texts(self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                             batch["response"], batch["sample_mask"])
        return text_end_scores(self.engine.reward, self.engine.reward_tokenizer, texts,
                               device=self.device)

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, response, sample_mask, *, logprobs=True):
        mine = rank_rows(len(prompt_ids))
        batch = {"prompt_ids": prompt_ids[mine], "prompt_mask": prompt_mask[mine],
                 "response": response[mine], "sample_mask": sample_mask[mine]}
        sequences, attention_mask = self._sequences(batch)
        prompt_length = prompt_ids.shape[1]
        tokens = self._tensor(batch["response"]).long()
        self.engine.eval()
        try:
            out = {}
            # logprobs False (conventions.old_logprobs rollout): no actor forward
            for name, model in (("logprobs", self.engine.actor if logprobs else None),
                                ("ref_logprobs", self.engine.ref)):
                if model is None:  # a served initial policy: the loop asks its server
                    continue
                logits = self._response_logits(model, sequences, attention_mask, prompt_length)
                out[name] = token_logprobs(logits, tokens)
                del logits
            if self.engine.critic is not None:  # critic-free runs: the loop's zeros
                out["values"] = self._values(self.engine.critic, sequences, attention_mask,
                                             prompt_length)
            if self.engine.reward is not None:  # function-only reward: the loop's
                out["scores"] = self._reward_scores(batch)
        finally:
            self.engine.train()
        return {k: all_gather_rows(v).cpu().numpy() for k, v in out.items()}

    # ------------------------------------------------------------ training

    def _ptx_loss(self, ptx: dict[str, np.ndarray], normalizer: float) -> torch.Tensor:
        ids, mask = self._tensor(ptx["input_ids"]).long(), self._tensor(ptx["attention_mask"])
        logits = causal_lm_logits(self.engine.actor, ids, mask).float()
        return sft_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:].float(), agg_mode="token-mean",
                        normalizer=normalizer)

    def _micro_step(self, batch: dict[str, np.ndarray], normalizer: float,
                    ptx: dict[str, np.ndarray] | None, ptx_normalizer: float | None,
                    kl_coef: float, sums: Counter) -> None:
        """Actor and critic forward/backward/step on this rank's rows of one micro-batch."""
        c = self.conventions
        t = {k: self._tensor(v) for k, v in batch.items()}
        sequences, attention_mask = self._sequences(batch)
        prompt_length = batch["prompt_ids"].shape[1]
        logits = self._response_logits(self.engine.actor, sequences, attention_mask,
                                       prompt_length)
        logprobs = token_logprobs(logits, t["response"].long())
        entropy = entropy_from_logits(logits) if c.entropy_coef != 0 else None
        with torch.no_grad():
            token_entropy = (entropy.detach() if entropy is not None
                             else entropy_from_logits(logits.detach()))
        critic = self.engine.critic
        mask = t["response_mask"]
        # the actor's losses; the critic's half is torch_rlhf.critic.critic_micro_step (the
        # one a served critic runs), after the actor's step as before
        actor_loss, _, stats = ppo_losses(
            logprobs, t["logprobs"], t["advantages"], None, t["values"], t["returns"], mask,
            conventions=c, entropy=entropy, ref_logprobs=t["ref_logprobs"], kl_coef=kl_coef,
            normalizer=normalizer, importance_weights=t.get("importance_weights"))
        total = actor_loss
        if ptx is not None:
            ptx_loss = self._ptx_loss(ptx, ptx_normalizer)
            total = actor_loss + self.config.ppo.unsup_coef * ptx_loss
            sums["ptx_loss"] += float(ptx_loss.detach())
        backward(self.engine.actor, total)
        actor_norm = optimizer_step(self.engine.actor)
        norms = {"actor_grad_norm": actor_norm}
        critic_loss = torch.zeros(())
        if critic is not None:
            critic_loss, stats["value_clip_fraction"], norms["critic_grad_norm"] = (
                critic_micro_step(critic, sequences, attention_mask, prompt_length, t,
                                  normalizer=normalizer, conventions=c))
        if actor_norm is not None:  # the accumulation boundary: the step's global norms
            self._grad_norms = norms
        tokens = float(mask.sum())
        sums["actor_loss"] += float(actor_loss.detach())
        sums["critic_loss"] += float(critic_loss.detach())
        sums["pg_loss"] += float(stats["pg_loss"].detach())
        sums["tokens"] += tokens
        for key in ("clip_fraction", "approx_kl", "value_clip_fraction"):
            sums[key] += float(stats[key].detach()) * tokens
        sums["entropy"] += float((token_entropy * mask).sum())

    @staticmethod
    def _reduced(sums: Counter, **last: float) -> dict[str, float]:
        keys = sorted(sums)
        return {**dict(zip(keys, map(float, all_reduce_sum([sums[k] for k in keys])),
                           strict=True)), **last}

    def train_step(self, micro_batches, *, normalizers, ptx, ptx_normalizers, kl_coef):
        mine = rank_rows(self.minibatch_rows)
        # the learning rates this optimiser step uses (the schedulers step at its end)
        lrs = {"actor_lr": current_lr(self.engine.actor)}
        if self.engine.critic is not None:
            lrs["critic_lr"] = current_lr(self.engine.critic)
        sums: Counter = Counter()
        self._grad_norms: dict[str, float] = {}
        self.rollout_module.mark_stale()
        self.engine.train()
        for a, (batch, normalizer) in enumerate(zip(micro_batches, normalizers, strict=True)):
            self._micro_step({k: v[mine] for k, v in batch.items()}, normalizer,
                             None if ptx is None else {k: v[mine] for k, v in ptx[a].items()},
                             None if ptx is None else ptx_normalizers[a], kl_coef, sums)
        return self._reduced(sums, **lrs, **self._grad_norms)

    def ptx_step(self, ptx, *, ptx_normalizers):
        mine = rank_rows(self.minibatch_rows)
        actor_lr = current_lr(self.engine.actor)
        sums: Counter = Counter()
        self.rollout_module.mark_stale()
        for batch, normalizer in zip(ptx, ptx_normalizers, strict=True):
            loss = self._ptx_loss({k: v[mine] for k, v in batch.items()}, normalizer)
            backward(self.engine.actor, self.config.ppo.unsup_coef * loss)
            optimizer_step(self.engine.actor)
            sums["ptx_loss"] += float(loss.detach())
        return self._reduced(sums, actor_lr=actor_lr)

    def update_ema(self) -> None:
        self.engine.update_ema()

    # ------------------------------------------------------------ checkpoints and export

    def _engines(self) -> dict[str, Any]:
        engines = {"actor": self.engine.actor, "critic": self.engine.critic}
        return {k: v for k, v in engines.items() if v is not None}

    saves_in_background = False

    def barrier(self) -> None:
        barrier()

    def wait_until_saved(self) -> None:
        pass

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        ema = self.engine.ema_state
        state = {**state, "ema": None if ema is None else ema.ema}
        self.checkpoint_files.write(
            path, self._engines(), state, tokenizer=self.tokenizer,
            lora={k: lora_settings(getattr(self.config.ppo, k)) for k in self._engines()})

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = self.checkpoint_files.load(path, self._engines())
        self.rollout_module.mark_stale()
        if state.get("ema") is not None and self.engine.ema is not None and is_main():
            self.engine.ema_state = self.engine.ema_state._replace(ema=state["ema"])
        return state

    def export(self, step_dir: Path) -> dict[str, str]:
        paths = {"final_model": step_dir / "final"}
        save_hf(self.engine.actor, self.tokenizer, str(paths["final_model"]))
        if self.engine.critic is not None:
            paths["critic_model"] = step_dir / "critic"
            save_hf(self.engine.critic, self.tokenizer, str(paths["critic_model"]))
        if self.engine.ema is not None:
            paths["ema_model"] = step_dir / "ema"
            self.engine.save_ema(str(paths["ema_model"]))
            barrier()  # rank 0 has written the directory
        return {k: str(v) for k, v in paths.items()}

    def heldout_metrics(self, model: str) -> dict[str, float]:
        if model == "actor":
            return heldout_metrics(self.engine.actor, self.tokenizer, self.config)
        ema = build_causal_lm(str(self.step_dir / "ema"), dtype=self.config.model.dtype)
        return heldout_metrics(ema.to(self.device), self.tokenizer, self.config)
