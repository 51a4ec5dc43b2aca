"""Step 3: PPO on the four models of :class:`~torch_rlhf.engine.RLHFEngine`.

One iteration is the algorithm of docs/architecture.md:

1. ``prompts = prompt_iterator.next_batch()`` (a global batch; each rank generates for
   its slice);
2. ``uniforms = shared.sampling_uniforms(seed, iteration, batch, shape=[B, N])`` drive the
   parity sampler (``torch_rlhf.generation.generate_rollout``; the path taken is logged and
   recorded as ``rollout_path``); the rollouts are all-gathered;
3. ``shared.short_answer_mask`` (``ppo.short_answer_policy: mask``) or DeepSpeed-Chat's
   rule (``dschat``: short answers dropped, a batch with none left reuses the last valid
   rollout); counted as ``short_answers``;
4. scoring at the rollout weights: actor log-probs (training forward), reference
   log-probs, critic values V(x, y_<t), reward end scores; ``rollout_logprob_gap``;
5. ``shared.compute_advantages`` on the whole buffer of ``generation_batches`` batches (KL
   coefficient from the controller; whitening over every rollout row of the iteration);
6. ``ppo_epochs`` passes over the buffer of ``generation_batches`` batches in the
   mini-batches of ``shared.minibatch_schedule``; ``shared.ppo_losses`` with the global
   token count of the optimiser step as normaliser, plus ``unsup_coef * ptx_loss``
   (``ppo.ptx_mode``: joint, in the same step; separate, DeepSpeed-Chat's extra step);
   the EMA is updated after every actor optimiser step (DeepSpeed-Chat's moving_average);
7. KL-controller update, metrics.

Shapes: B rollout rows, P = ``max_prompt_seq_len``, N = ``max_answer_seq_len``; every
``[B, N]`` array is response-aligned (index t is answer token t).

Python API::

    trainer = PPOTrainer(config, run_dir="runs/x", actor_model_name_or_path="runs/x/sft/final",
                         critic_model_name_or_path="runs/x/reward/final")
    prompts = trainer.prompt_iterator.next_batch()
    experience = trainer.generate_experience(prompts, iteration=0, batch_index=0)
    metrics = trainer.train_on_experience([experience], iteration=0)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.aggregation import loss_normalizer
from shared.config import RLHFConfig
from shared.data import BatchIterator, PromptBatch, StepData, TextBatch, build_ptx_data
from shared.data import build_step_data as _build_step_data
from shared.evaluation import decode_answers
from shared.logprobs import entropy_from_logits, token_logprobs
from shared.masked import masked_mean
from shared.ppo_step import compute_advantages, make_kl_controller, ppo_losses
from shared.rollout import (
    minibatch_schedule,
    ppo_update_counts,
    sampling_uniforms,
    short_answer_mask,
)
from shared.runlog import PhaseTimer, RunLogger, progress
from shared.sft_loss import sft_loss
from torch_rlhf.checkpoint import CheckpointManager, truncate_metrics
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
from torch_rlhf.models import build_causal_lm, causal_lm_logits, gather_end_values
from torch_rlhf.optim import backward, current_lr, optimizer_step
from torch_rlhf.runtime import format_metrics, lora_settings, open_run_logger, resolve_tokenizer
from torch_rlhf.saving import save_hf

__all__ = ["Experience", "PPOTrainer", "Rollout"]

logger = logging.getLogger(__name__)

_LOG_KEYS = ("actor_loss", "critic_loss", "ptx_loss", "reward_score", "kl", "kl_coef",
             "clip_fraction", "response_length", "short_answers", "rollout_logprob_gap")


@dataclasses.dataclass
class Rollout:
    """Sampled answers of one global generation batch (every rank holds all rows).

    Attributes:
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      response, response_mask: [B, N] tokens (pad after EOS), 1 up to and including EOS.
      logprobs: [B, N] log-probs recorded while sampling (0 where the mask is 0).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor

    @property
    def sequences(self) -> torch.Tensor:  # [B, P + N]
        return torch.cat([self.prompt_ids, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + N]
        return torch.cat([self.prompt_mask, self.response_mask], 1)


@dataclasses.dataclass
class Experience:
    """A scored rollout batch with advantages: what PPO trains on (all rows, all ranks).

    Attributes:
      sequences, attention_mask: [B, P + N] prompt then answer; the mask covers the whole
        answer up to EOS (also for short answers), as the forwards saw it.
      response: [B, N] answer tokens.
      response_mask: [B, N] float, the loss mask: 0 for short answers (rule of step 3).
      logprobs, ref_logprobs, values: [B, N] actor (training forward), reference and
        critic at the rollout weights.
      scores: [B] reward-model end scores.
      advantages, returns, kl, token_rewards: [B, N] from ``shared.compute_advantages``.
      is_short: [B] bool, answers shorter than ``ppo.min_answer_tokens``.
      response_length: [B] real answer tokens, EOS included.
      logprob_gap: max |sampling log-prob - training-forward log-prob| over real tokens.
      short_answers: short answers generated for this batch (before any reuse).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    token_rewards: torch.Tensor
    is_short: torch.Tensor
    response_length: torch.Tensor
    logprob_gap: float = 0.0
    short_answers: int = 0

    _ROW_FIELDS = ("sequences", "attention_mask", "response", "response_mask", "logprobs",
                   "ref_logprobs", "values", "scores", "advantages", "returns", "kl",
                   "token_rewards", "is_short", "response_length")

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def take(self, rows: np.ndarray | slice) -> Experience:
        """The rows ``rows`` of every per-row field."""
        index = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        return dataclasses.replace(
            self, **{f: getattr(self, f)[index.to(getattr(self, f).device)
                                         if isinstance(index, torch.Tensor) else index]
                     for f in self._ROW_FIELDS})

    @staticmethod
    def cat(batches: list[Experience]) -> Experience:
        """One buffer from several generation batches (rows in order)."""
        first = batches[0]
        return dataclasses.replace(
            first, logprob_gap=max(b.logprob_gap for b in batches),
            short_answers=sum(b.short_answers for b in batches),
            **{f: torch.cat([getattr(b, f) for b in batches]) for f in Experience._ROW_FIELDS})


class PPOTrainer:
    """PPO with ``config.ppo`` on an :class:`RLHFEngine` (DS-Chat ``DeepSpeedPPOTrainer``).

    Args:
      config: the run config.
      run_dir: the run directory; this step writes ``<run_dir>/ppo/``.
      actor_model_name_or_path: the SFT model (actor and reference); default
        ``model.actor_model_name_or_path`` (or a fresh ``actor_config`` model).
      critic_model_name_or_path: the reward model (critic and reward); default
        ``model.critic_model_name_or_path`` (or a fresh ``critic_config`` model).
      tokenizer, data, ptx_data, run_logger: defaults built from the config.
      engine: an already built RLHFEngine (its LR schedules must fit this run).

    Attributes:
      engine: the RLHFEngine; prompt_iterator / ptx_iterator: resumable data iterators;
      iteration: completed iterations; total_iterations; kl_state: the KL controller
      state (``kl_state.kl_coef``).
    """

    step = "ppo"

    def __init__(self, config: RLHFConfig, *, run_dir: str | Path,
                 actor_model_name_or_path: str | None = None,
                 critic_model_name_or_path: str | None = None, tokenizer=None,
                 data: StepData | None = None, ptx_data: StepData | None = None,
                 run_logger: RunLogger | None = None, engine: RLHFEngine | None = None):
        self.config = config
        ppo = config.ppo
        self.run_dir = Path(run_dir)
        self.step_dir = self.run_dir / self.step
        actor_path = actor_model_name_or_path or config.model.actor_model_name_or_path
        critic_path = critic_model_name_or_path or config.model.critic_model_name_or_path
        self.tokenizer = tokenizer or resolve_tokenizer(config, actor_path)
        self.data = data or _build_step_data(config.data, self.tokenizer, "ppo")
        self.run_logger = run_logger or open_run_logger(config, run_dir)
        self.conventions = ppo.conventions
        if ppo.align_overflow:
            if config.model.dtype == "fp16":
                raise NotImplementedError(
                    "ppo.align_overflow (skip both optimiser steps when either overflows in "
                    "fp16) is not implemented by the torch backend; use model.dtype: bf16 or "
                    "set ppo.align_overflow: false")
            logger.warning("ppo.align_overflow only concerns fp16 loss scaling; ignored for %s",
                           config.model.dtype)
        self.eos_token_id = eos_token_id(config, self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        size = world_size()
        self.generation_batch_size = ppo.per_device_generation_batch_size * size
        self.minibatch_size = ppo.per_device_training_batch_size * size
        self.generation_batches = self._generation_batches()
        self.prompt_iterator = BatchIterator(self.data.train, self.generation_batch_size,
                                             seed=config.seed, shuffle=True, drop_last=True,
                                             name="ppo prompts")
        counts = ppo_update_counts(
            num_prompts=len(self.data.train), world_size=size,
            generation_batch_size=ppo.per_device_generation_batch_size,
            generation_batches=self.generation_batches,
            training_batch_size=ppo.per_device_training_batch_size, ppo_epochs=ppo.ppo_epochs,
            gradient_accumulation_steps=ppo.gradient_accumulation_steps,
            num_train_epochs=ppo.num_train_epochs, max_iterations=ppo.max_iterations)
        if counts.minibatches_per_iteration % ppo.gradient_accumulation_steps:
            raise ValueError(
                f"ppo.gradient_accumulation_steps: {ppo.gradient_accumulation_steps} does not "
                f"divide the {counts.minibatches_per_iteration} mini-batches of an iteration "
                "(ppo_epochs x rollout rows / per_device_training_batch_size)")
        self.total_iterations = counts.total_optimizer_steps // counts.optimizer_steps_per_iteration
        self.ptx_data = ptx_data
        if self.ptx_data is None and ppo.unsup_coef > 0:
            self.ptx_data = build_ptx_data(config.data, self.tokenizer)
        self.ptx_enabled = ppo.unsup_coef > 0 and self.ptx_data is not None
        self.ptx_iterator = None
        if self.ptx_enabled:
            # One ptx batch per actor optimiser step (DeepSpeed-Chat zips an unsupervised
            # batch with every experience mini-batch), as the JAX backend.
            ptx_rows = self.minibatch_size * ppo.gradient_accumulation_steps
            self.ptx_iterator = BatchIterator(
                self.ptx_data.train, ptx_rows, seed=config.seed, shuffle=True,
                drop_last=len(self.ptx_data.train) >= ptx_rows, name="ppo ptx")
        separate = self.ptx_enabled and ppo.ptx_mode == "separate"
        actor_steps = counts.total_optimizer_steps * (2 if separate else 1)
        self.engine = engine or RLHFEngine(
            config, actor_model_name_or_path=actor_path,
            critic_model_name_or_path=critic_path, tokenizer=self.tokenizer,
            actor_total_steps=actor_steps, critic_total_steps=counts.total_optimizer_steps)
        self.kl_controller = make_kl_controller(self.conventions)
        self.kl_state = self.kl_controller.init()
        self.checkpoints = CheckpointManager(self.step_dir / "checkpoints",
                                             keep=config.logging.keep_checkpoints)
        self.iteration = 0
        self.last_valid_rollout: Rollout | None = None
        self.last_metrics: dict[str, Any] = {}
        self.rollout_path = self.engine.rollout_path
        self.timer = PhaseTimer()
        self.elapsed: Counter = Counter()
        self.device = self.engine.actor.device

    def _generation_batches(self) -> int:
        ppo = self.config.ppo
        if ppo.num_rollout_samples is None:
            return ppo.generation_batches
        batches, rest = divmod(ppo.num_rollout_samples, self.generation_batch_size)
        if rest or batches == 0:
            raise ValueError(f"ppo.num_rollout_samples: {ppo.num_rollout_samples} is not a "
                             f"positive multiple of the global generation batch "
                             f"{self.generation_batch_size}")
        return batches

    # ------------------------------------------------------------ steps 1-5: experience

    def generate_experience(self, prompts: PromptBatch, *, iteration: int,
                            batch_index: int) -> Experience:
        """Steps 2-5 for one global generation batch: rollout, short-answer rule, scoring,
        advantages. Every rank must call this with the same ``prompts``."""
        with self.timer.phase("generation"):
            rollout = self.rollout(prompts, iteration=iteration, batch_index=batch_index)
        response_mask, is_short = short_answer_mask(rollout.response_mask,
                                                    min_tokens=self.config.ppo.min_answer_tokens)
        short_answers = int(is_short.sum())
        if self.config.ppo.short_answer_policy == "dschat":
            if bool(is_short.all()):
                if self.last_valid_rollout is None:
                    raise RuntimeError(f"every answer of iteration {iteration} batch "
                                       f"{batch_index} is too short and there is no earlier "
                                       "valid rollout to reuse (ppo.short_answer_policy: dschat)")
                logger.warning("iteration %d batch %d: every answer is too short; reusing the "
                               "last valid rollout", iteration, batch_index)
                rollout = self.last_valid_rollout
                response_mask, is_short = short_answer_mask(
                    rollout.response_mask, min_tokens=self.config.ppo.min_answer_tokens)
            else:
                self.last_valid_rollout = rollout
        with self.timer.phase("scoring"):
            experience = self.score(rollout, response_mask, is_short)
        experience.short_answers = short_answers
        ppo = self.config.ppo
        if ppo.print_answers and iteration % ppo.print_answers_interval == 0:
            self._print_answers(rollout, iteration)
        return experience

    def rollout(self, prompts: PromptBatch, *, iteration: int, batch_index: int) -> Rollout:
        """Step 2: sample answers for this rank's slice of the prompts; gather all rows."""
        rows, answer_len = len(prompts), self.config.data.max_answer_seq_len
        uniforms = sampling_uniforms(self.config.seed, iteration, batch_index,
                                     shape=(rows, answer_len))
        mine = rank_rows(rows)
        prompt_ids = torch.from_numpy(prompts.prompt_input_ids).long().to(self.device)
        prompt_mask = torch.from_numpy(prompts.prompt_attention_mask).long().to(self.device)
        sampling = self.config.ppo.sampling
        output, self.rollout_path = generate_rollout(
            self.engine.actor, prompt_ids[mine], prompt_mask[mine],
            hybrid_engine=self.config.engine.torch.hybrid_engine, max_new_tokens=answer_len,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            uniforms=uniforms[mine], do_sample=sampling.do_sample,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        return Rollout(prompt_ids, prompt_mask, all_gather_rows(output.response),
                       all_gather_rows(output.response_mask),
                       all_gather_rows(output.logprobs.float()))

    def _response_logits(self, model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_length: int) -> torch.Tensor:
        # logits[:, P - 1 + t] predicts answer token t: [B, N, V], upcast for the losses;
        # only those N positions go through the LM head.
        device = next(iter(model.parameters())).device
        logits = causal_lm_logits(model, sequences.to(device), attention_mask.to(device),
                                  positions=slice(prompt_length - 1, -1))
        return logits.float().to(self.device)

    def _values(self, model, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
        # values[:, P - 1 + t] = V(x, y_<t), the critic at the position predicting token t.
        return model(sequences, attention_mask).float()[:, prompt_length - 1:-1]

    def _reward_scores(self, rollout: Rollout, rows: slice) -> torch.Tensor:
        sequences, attention_mask = rollout.sequences[rows], rollout.attention_mask[rows]
        prompt_length = rollout.prompt_ids.shape[1]
        if self.engine.reward_reads_actor_tokens:
            values = self.engine.reward(sequences, attention_mask).float()
            return gather_end_values(values, attention_mask, prompt_length=prompt_length)
        # Different vocabularies: decode the actor's tokens, re-encode for the reward model.
        prompts = self.tokenizer.batch_decode(rollout.prompt_ids[rows], skip_special_tokens=True)
        answers = decode_answers(self.tokenizer, rollout.response[rows].cpu().numpy(),
                                 rollout.response_mask[rows].cpu().numpy())
        eos = self.engine.reward_tokenizer.eos_token or ""
        encoded = self.engine.reward_tokenizer(
            [p + a + eos for p, a in zip(prompts, answers, strict=True)], padding="longest",
            return_tensors="pt", add_special_tokens=True)
        ids = encoded["input_ids"].to(self.device)
        mask = encoded["attention_mask"].to(self.device)
        if self.engine.reward_tokenizer.padding_side == "left":
            ids, mask = ids.flip(1), mask.flip(1)  # only the count of real tokens matters
        values = self.engine.reward(ids, mask).float()
        return values.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]

    @torch.no_grad()
    def score(self, rollout: Rollout, response_mask: torch.Tensor,
              is_short: torch.Tensor) -> Experience:
        """Steps 4-5: score this rank's rows at the rollout weights, gather, advantages."""
        mine = rank_rows(rollout.response.shape[0])
        prompt_length = rollout.prompt_ids.shape[1]
        sequences, attention_mask = rollout.sequences, rollout.attention_mask
        real = rollout.response_mask[mine].float()
        response = rollout.response[mine]
        self.engine.eval()
        try:
            actor_logits = self._response_logits(self.engine.actor, sequences[mine],
                                                 attention_mask[mine], prompt_length)
            logprobs = token_logprobs(actor_logits, response) * real
            del actor_logits
            ref_logits = self._response_logits(self.engine.ref, sequences[mine],
                                               attention_mask[mine], prompt_length)
            ref_logprobs = token_logprobs(ref_logits, response) * real
            del ref_logits
            values = self._values(self.engine.critic, sequences[mine], attention_mask[mine],
                                  prompt_length) * real
            scores = self._reward_scores(rollout, mine)
        finally:
            self.engine.train()
        logprobs, ref_logprobs, values, scores = (
            all_gather_rows(t) for t in (logprobs, ref_logprobs, values, scores))
        original = rollout.response_mask.float()
        gap = float(((rollout.logprobs - logprobs).abs() * original).max())
        response_mask = response_mask.float().to(self.device)
        experience = Experience(
            sequences=sequences, attention_mask=attention_mask, response=rollout.response,
            response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, scores=scores, advantages=None, returns=None, kl=None,
            token_rewards=None, is_short=is_short.bool(), response_length=original.sum(1),
            logprob_gap=gap)
        return self.with_advantages(experience)

    def with_advantages(self, experience: Experience) -> Experience:
        """Step 5: ``shared.compute_advantages`` on every row of ``experience`` (whitening,
        when the conventions whiten, over all of them) with the controller's coefficient."""
        out = compute_advantages(experience.scores, experience.logprobs,
                                 experience.ref_logprobs, experience.values,
                                 experience.response_mask, conventions=self.conventions,
                                 kl_coef=self.kl_state.kl_coef)
        return dataclasses.replace(experience, advantages=out["advantages"],
                                   returns=out["returns"], kl=out["kl"],
                                   token_rewards=out["token_rewards"])

    # ------------------------------------------------------------ steps 6-7: training

    def _ptx_batch(self, rows: int) -> TextBatch | None:
        """The next ptx batch of one optimiser step, its rows cycled to exactly ``rows`` (only
        when the whole ptx set is smaller than one batch)."""
        if not self.ptx_enabled:
            return None
        batch = self.ptx_iterator.next_batch()
        if len(batch) != rows:
            batch = batch.take(np.arange(rows) % len(batch))
        return batch

    def _ptx_loss(self, batch: TextBatch, normalizer: float) -> torch.Tensor:
        ids = torch.from_numpy(batch.input_ids).long().to(self.device)
        mask = torch.from_numpy(batch.attention_mask).long().to(self.device)
        logits = causal_lm_logits(self.engine.actor, ids, mask).float()
        return sft_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:].float(), agg_mode="token-mean",
                        normalizer=normalizer)

    def _ppo_micro_step(self, batch: Experience, normalizer: float, ptx: TextBatch | None,
                        ptx_normalizer: float, sums: Counter) -> None:
        """Actor and critic forward/backward/step on this rank's rows of one mini-batch."""
        c, ppo = self.conventions, self.config.ppo
        prompt_length = batch.prompt_length
        logits = self._response_logits(self.engine.actor, batch.sequences, batch.attention_mask,
                                       prompt_length)
        logprobs = token_logprobs(logits, batch.response)
        entropy = entropy_from_logits(logits) if c.entropy_coef != 0 else None
        with torch.no_grad():
            token_entropy = (entropy.detach() if entropy is not None
                             else entropy_from_logits(logits.detach()))
        values = self._values(self.engine.critic, batch.sequences, batch.attention_mask,
                              prompt_length)
        actor_loss, critic_loss, stats = ppo_losses(
            logprobs, batch.logprobs, batch.advantages, values, batch.values, batch.returns,
            batch.response_mask, conventions=c, entropy=entropy, ref_logprobs=batch.ref_logprobs,
            kl_coef=self.kl_state.kl_coef, normalizer=normalizer)
        total = actor_loss
        if ptx is not None and ppo.ptx_mode == "joint":
            ptx_loss = self._ptx_loss(ptx, ptx_normalizer)
            total = actor_loss + ppo.unsup_coef * ptx_loss
            sums["ptx_loss"] += float(ptx_loss.detach())
        backward(self.engine.actor, total)
        optimizer_step(self.engine.actor)
        backward(self.engine.critic, critic_loss)
        optimizer_step(self.engine.critic)
        tokens = float(batch.response_mask.sum())
        sums["actor_loss"] += float(actor_loss.detach())
        sums["critic_loss"] += float(critic_loss.detach())
        sums["pg_loss"] += float(stats["pg_loss"].detach())
        sums["tokens"] += tokens
        for key in ("clip_fraction", "approx_kl", "value_clip_fraction"):
            sums[key] += float(stats[key].detach()) * tokens
        sums["entropy"] += float((token_entropy * batch.response_mask).sum())

    def _ptx_step(self, ptx: TextBatch, normalizer: float, sums: Counter) -> None:
        """DeepSpeed-Chat's ``train_unsupervised``: an actor step on the ptx loss alone."""
        ptx_loss = self._ptx_loss(ptx, normalizer)
        backward(self.engine.actor, self.config.ppo.unsup_coef * ptx_loss)
        optimizer_step(self.engine.actor)
        sums["ptx_loss"] += float(ptx_loss.detach())

    def train_on_experience(self, buffer: list[Experience], *, iteration: int) -> dict[str, Any]:
        """Steps 6-7: ``ppo_epochs`` passes over the buffer, then the KL controller, the EMA
        and the iteration's metrics. Every rank must call this with the same buffer."""
        ppo, c = self.config.ppo, self.conventions
        # Advantages over the whole buffer (all generation batches), as the JAX backend:
        # whitening statistics are those of every rollout row of the iteration.
        experience = Experience.cat(buffer)
        if len(buffer) > 1:
            experience = self.with_advantages(experience)
        rows = len(experience)
        schedule = minibatch_schedule(rows, self.minibatch_size, ppo_epochs=ppo.ppo_epochs,
                                      shuffle=ppo.shuffle_minibatches, seed=self.config.seed,
                                      iteration=iteration)
        minibatches = [mb for epoch in schedule for mb in epoch]
        accumulation = ppo.gradient_accumulation_steps
        groups = [minibatches[i:i + accumulation] for i in range(0, len(minibatches), accumulation)]
        actor_lr = critic_lr = 0.0
        kl_coef = float(self.kl_state.kl_coef)
        step_sums: list[Counter] = []
        mine = rank_rows(self.minibatch_size)
        response_mask = experience.response_mask.cpu().numpy()
        with self.timer.phase("training"):
            self.engine.train()
            for group in groups:
                sums: Counter = Counter()
                group_rows = np.concatenate(group)
                normalizer = float(loss_normalizer(response_mask[group_rows],
                                                   mode=c.loss_agg_mode))
                # One ptx batch per optimiser step; micro-batch a reads its rows a*M ...
                ptx = self._ptx_batch(len(group_rows))
                ptx_normalizer = 0.0
                if ptx is not None:
                    ptx_normalizer = float(ptx.attention_mask[:, 1:].sum())
                size = self.minibatch_size
                ptx_micro = [None if ptx is None else ptx.take(slice(a * size, (a + 1) * size))
                             for a in range(len(group))]
                # The learning rates this optimiser step uses (the schedulers step at the
                # accumulation boundary); the metrics report the iteration's last step's.
                actor_lr, critic_lr = current_lr(self.engine.actor), current_lr(self.engine.critic)
                for rows_of_mb, ptx_mb in zip(group, ptx_micro, strict=True):
                    self._ppo_micro_step(experience.take(rows_of_mb[mine]), normalizer,
                                         None if ptx_mb is None else ptx_mb.take(mine),
                                         ptx_normalizer, sums)
                if ptx is not None and ppo.ptx_mode == "separate":
                    actor_lr = current_lr(self.engine.actor)
                    for ptx_mb in ptx_micro:
                        self._ptx_step(ptx_mb.take(mine), ptx_normalizer, sums)
                # EMA after every actor optimiser step (with ptx_mode separate: after the ptx
                # step of the same mini-batch), as DeepSpeed-Chat's moving_average.
                self.engine.update_ema()
                step_sums.append(sums)
        keys = sorted(set().union(*step_sums))
        flat = all_reduce_sum([s[k] for s in step_sums for k in keys])
        totals = [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)], strict=True))
                  for i in range(len(step_sums))]
        metrics = self._metrics(experience, totals, kl_coef, actor_lr, critic_lr)
        self._update_kl_controller(experience)
        return metrics

    def _update_kl_controller(self, experience: Experience) -> None:
        valid = ~experience.is_short
        rows = int(valid.sum())
        sequence_kl = (experience.kl * experience.response_mask).sum(1)
        current = float(sequence_kl[valid].mean()) if rows else 0.0
        self.kl_state = self.kl_controller.update(self.kl_state, current_kl=current,
                                                  n_steps=rows)

    def _metrics(self, experience: Experience, steps: list[dict[str, float]], kl_coef: float,
                 actor_lr: float, critic_lr: float) -> dict[str, Any]:
        # Training statistics: each optimiser step's value (losses summed over its
        # micro-batches, token statistics weighted by the step's tokens), then the mean over
        # the iteration's steps, as the JAX backend.
        def step_mean(key: str, per_token: bool = False) -> float:
            values = [s.get(key, 0.0) / (max(s.get("tokens", 0.0), 1.0) if per_token else 1.0)
                      for s in steps]
            return float(np.mean(values)) if values else 0.0

        valid = ~experience.is_short
        mask = experience.response_mask
        sequence_kl = (experience.kl * mask).sum(1)
        metrics = {
            "actor_loss": step_mean("actor_loss"),
            "critic_loss": step_mean("critic_loss"),
            "pg_loss": step_mean("pg_loss"),
            "clip_fraction": step_mean("clip_fraction", per_token=True),
            "approx_kl": step_mean("approx_kl", per_token=True),
            "value_clip_fraction": step_mean("value_clip_fraction", per_token=True),
            "entropy": step_mean("entropy", per_token=True),
            "reward_score": float(experience.scores[valid].mean()) if valid.any() else 0.0,
            "kl": float(sequence_kl[valid].mean()) if valid.any() else 0.0,
            "kl_coef": kl_coef,
            "advantages_mean": float(masked_mean(experience.advantages, mask)),
            "returns_mean": float(masked_mean(experience.returns, mask)),
            "response_length": float(experience.response_length.mean()),
            "short_answers": experience.short_answers,
            "rollout_logprob_gap": experience.logprob_gap,
            "ptx_loss": step_mean("ptx_loss"),
            "actor_lr": actor_lr,
            "critic_lr": critic_lr,
        }
        return metrics

    # ------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        self.elapsed.update(self.timer.pop())
        ema = self.engine.ema_state
        return {
            "iteration": self.iteration,
            "prompt_iterator": self.prompt_iterator.state_dict(),
            "ptx_iterator": None if self.ptx_iterator is None else self.ptx_iterator.state_dict(),
            "kl_coef": float(self.kl_state.kl_coef),
            "ema": None if ema is None else ema.ema,
            "last_valid_rollout": (None if self.last_valid_rollout is None
                                   else dataclasses.asdict(self.last_valid_rollout)),
            "last_metrics": self.last_metrics,
            "elapsed": dict(self.elapsed),
        }

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of actor, critic and trainer state, named after the
        iteration."""
        return self.checkpoints.save(
            f"iter-{self.iteration:08d}", {"actor": self.engine.actor,
                                           "critic": self.engine.critic},
            self._trainer_state(), tokenizer=self.tokenizer,
            lora={"actor": lora_settings(self.config.ppo.actor),
                  "critic": lora_settings(self.config.ppo.critic)})

    def resume(self) -> bool:
        """Continue from the latest checkpoint of this step; False when there is none."""
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("ppo: no checkpoint in %s; starting from iteration 0",
                        self.checkpoints.root)
            return False
        state = self.checkpoints.load(latest, {"actor": self.engine.actor,
                                               "critic": self.engine.critic})
        self.iteration = int(state["iteration"])
        self.prompt_iterator.load_state_dict(state["prompt_iterator"])
        if self.ptx_iterator is not None:
            self.ptx_iterator.load_state_dict(state["ptx_iterator"])
        self.kl_state = self.kl_state._replace(kl_coef=state["kl_coef"])
        if state["ema"] is not None and self.engine.ema is not None and is_main():
            self.engine.ema_state = self.engine.ema_state._replace(ema=state["ema"])
        if state["last_valid_rollout"] is not None:
            self.last_valid_rollout = Rollout(**{k: v.to(self.device) for k, v in
                                                 state["last_valid_rollout"].items()})
        self.last_metrics = dict(state["last_metrics"])
        self.elapsed = Counter(state["elapsed"])
        truncate_metrics(self.run_dir, self.step, "iteration", self.iteration + 1)
        logger.info("ppo: resumed from %s at iteration %d/%d", latest, self.iteration,
                    self.total_iterations)
        return True

    # ------------------------------------------------------------ the loop

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Iterate to ``total_iterations``; save ``ppo/final`` (actor), ``ppo/critic``,
        ``ppo/ema``; evaluate; return this step's ``summary.json`` entry."""
        if resume:
            self.resume()
        cfg = self.config.logging
        start = time.perf_counter()
        bar = progress(self.total_iterations, desc="ppo", initial=self.iteration,
                       enabled=cfg.progress_bar and is_main())
        while self.iteration < self.total_iterations:
            started = time.perf_counter()
            buffer = [self.generate_experience(self.prompt_iterator.next_batch(),
                                               iteration=self.iteration, batch_index=b)
                      for b in range(self.generation_batches)]
            metrics = self.train_on_experience(buffer, iteration=self.iteration)
            self.iteration += 1
            metrics.update({k: round(v, 6) for k, v in self._phase_times().items()})
            metrics["rollout_path"] = self.rollout_path
            self.last_metrics = metrics
            if self.iteration % cfg.log_interval == 0 or self.iteration == self.total_iterations:
                self.run_logger.log(self.step, self.iteration, metrics)
                self._log_lines(metrics, time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_score']:.3f}", kl=f"{metrics['kl']:.3f}")
            last = self.iteration == self.total_iterations
            if cfg.save_interval and self.iteration % cfg.save_interval == 0 and not last:
                self.save_checkpoint()
        bar.close()
        latest = self.checkpoints.latest()
        if latest is None or latest.name != f"iter-{self.iteration:08d}":
            self.save_checkpoint()
        return self._finish(time.perf_counter() - start)

    def _phase_times(self) -> dict[str, float]:
        times = self.timer.pop()
        self.elapsed.update(times)
        return {k: times.get(k, 0.0) for k in ("generation_time", "scoring_time",
                                               "training_time")}

    def _log_lines(self, metrics: dict[str, Any], seconds: float) -> None:
        # DeepSpeed-Chat's step-3 run log: losses, average reward, then the timings.
        epoch = self.prompt_iterator.epoch
        logger.info("epoch: %d|step: %d|ppo_ep: %d|act_loss: %.4f|cri_loss: %.4f|"
                    "unsuper_loss: %.4f", epoch, self.iteration, self.config.ppo.ppo_epochs,
                    metrics["actor_loss"], metrics["critic_loss"], metrics["ptx_loss"])
        logger.info("average reward score: %.4f|kl: %.4f|kl_coef: %.4g|short answers: %d",
                    metrics["reward_score"], metrics["kl"], metrics["kl_coef"],
                    metrics["short_answers"])
        logger.info("iteration %d/%d => latency %.2fs|generation %.2fs|scoring %.2fs|"
                    "training %.2fs|rollout path: %s", self.iteration, self.total_iterations,
                    seconds, metrics["generation_time"], metrics["scoring_time"],
                    metrics["training_time"], metrics["rollout_path"])
        logger.debug("ppo metrics %s", format_metrics(metrics, _LOG_KEYS))

    def _print_answers(self, rollout: Rollout, iteration: int, count: int = 4) -> None:
        if not is_main():
            return
        prompts = self.tokenizer.batch_decode(rollout.prompt_ids[:count],
                                              skip_special_tokens=True)
        answers = decode_answers(self.tokenizer, rollout.response[:count].cpu().numpy(),
                                 rollout.response_mask[:count].cpu().numpy())
        for prompt, answer in zip(prompts, answers, strict=True):
            logger.info("--- iteration %d prompt: %r answer: %r", iteration, prompt, answer)

    def _finish(self, seconds: float) -> dict[str, Any]:
        final, critic_dir, ema_dir = (self.step_dir / name for name in ("final", "critic", "ema"))
        save_hf(self.engine.actor, self.tokenizer, str(final))
        save_hf(self.engine.critic, self.tokenizer, str(critic_dir))
        with self.timer.phase("heldout_evaluation"):
            entry: dict[str, Any] = {}
            heldout = heldout_metrics(self.engine.actor, self.tokenizer, self.config)
            if heldout:
                entry["heldout"] = heldout
            if self.engine.ema is not None:
                self.engine.save_ema(str(ema_dir))
                entry["ema_model"] = str(ema_dir)
                if heldout:
                    barrier()  # rank 0 has written the directory
                    ema_model = build_causal_lm(str(ema_dir), dtype=self.config.model.dtype)
                    entry["heldout_ema"] = heldout_metrics(ema_model.to(self.device),
                                                           self.tokenizer, self.config)
        self.elapsed.update(self.timer.pop())
        timings = {k: round(v, 3) for k, v in sorted(self.elapsed.items())}
        timings["wall_time"] = round(seconds, 3)
        entry.update({
            "final_reward": self.last_metrics.get("reward_score"),
            "final_kl": self.last_metrics.get("kl"),
            "iterations": self.iteration,
            "rollout_path": self.rollout_path,
            "timings": timings,
            "final_model": str(final),
            "critic_model": str(critic_dir),
        })
        self.run_logger.update_summary(ppo=entry, backend="torch")
        logger.info("ppo done: final reward %.4f, final kl %.4f -> %s",
                    entry["final_reward"] or 0.0, entry["final_kl"] or 0.0, final)
        return entry
