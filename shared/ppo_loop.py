"""Step 3, once for both backends: the PPO loop around a small model protocol.

One iteration (docs/architecture.md):

1. ``generation_batches`` prompt batches from a resumable ``BatchIterator``;
2. per batch, ``sampling_uniforms(seed, iteration, batch)`` drive ``backend.generate``;
   ``conventions.mask_pad_tokens`` takes sampled pad tokens out of the answer's mask;
3. the short-answer rule (``ppo.short_answer_policy``): too-short rows are masked; under
   ``dschat`` a batch with none left reuses the last valid rollout (an error when there is
   none, as DeepSpeed-Chat asserts);
4. ``backend.score``: training-forward log-probs, reference log-probs, critic values and
   reward end scores at the rollout weights, unmasked; ``rollout_logprob_gap``;
5. ``shared.compute_advantages`` over the whole buffer with the KL controller's coefficient
   (per generation batch on its own answer width with ``conventions.trim_answer_width``);
6. ``ppo_epochs`` passes of ``minibatch_schedule`` mini-batches; ``gradient_accumulation_steps``
   consecutive mini-batches are one ``backend.train_step`` (normalisers per
   ``conventions.accumulation_scaling``), one ptx batch per actor step (``ppo.ptx_mode``
   joint, or ``backend.ptx_step`` for separate), ``backend.update_ema`` after every actor step;
7. the KL controller update, metrics, log and checkpoint cadence.

A backend subclasses ``PPOLoop`` and implements the methods of ``PPOBackend``; everything
else (iterators, counts, metrics, resume, export layout, summary) lives here, so the two
backends cannot drift. Arrays crossing the protocol are numpy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.aggregation import loss_normalizer
from shared.checkpoints import CheckpointDir
from shared.config import RLHFConfig
from shared.console import FILE_ONLY, console_every
from shared.critic_free import (
    group_prompts,
    models_used,
    outcome_advantages,
    rollout_correction,
)
from shared.data import BatchIterator, PromptBatch, TextBatch, build_ptx_data, build_step_data
from shared.errors import RunError
from shared.evaluation import decode_answers
from shared.experience import Experience
from shared.exports import verify_export
from shared.guard import NonFiniteGuard, nonfinite_arrays, nonfinite_values
from shared.manifest import config_fingerprint
from shared.masked import masked_whiten
from shared.model_card import ExportCard, complete_export, describe_source
from shared.old_logprobs import OldLogprobs
from shared.ppo_step import compute_advantages, make_kl_controller
from shared.reward_fn import load_reward_function, mix_rewards
from shared.reward_text import rollout_texts
from shared.rollout import minibatch_schedule, ppo_update_counts, sampling_uniforms
from shared.runlog import PhaseTimer, RunLogger, progress, truncate_metrics
from shared.serving.critic_client import ServedCritic
from shared.serving.roles import ServedScoring

__all__ = ["PHASES", "PPOBackend", "PPOLoop", "TOKEN_STATS", "generation_batches", "ppo_counts"]

logger = logging.getLogger(__name__)

PHASES = ("generation", "scoring", "training")
TOKEN_STATS = ("clip_fraction", "approx_kl", "value_clip_fraction", "entropy")
"""Step statistics the backends return as token-weighted sums (divided by ``tokens`` here)."""
LAST_STEP = ("actor_lr", "critic_lr")
"""Reported from the iteration's last optimiser step; every other training statistic is the
mean over the iteration's optimiser steps."""
CRITIC_STATS = ("critic_loss", "value_clip_fraction", "critic_lr", "critic_grad_norm")
"""Statistics of the critic's step: 0 in the metrics of a critic-free run."""


def generation_batches(config: RLHFConfig, *, world_size: int) -> int:
    """Generation batches per iteration: ``ppo.generation_batches``, or
    ``ppo.num_rollout_samples`` over the global generation batch."""
    ppo = config.ppo
    if ppo.num_rollout_samples is None:
        return ppo.generation_batches
    rows = ppo.per_device_generation_batch_size * world_size
    batches, rest = divmod(ppo.num_rollout_samples, rows)
    if rest or batches == 0:
        raise ValueError(f"ppo.num_rollout_samples: {ppo.num_rollout_samples} is not a "
                         f"positive multiple of the global generation batch {rows}")
    return batches


def ppo_counts(config: RLHFConfig, *, train_prompts: int, world_size: int) -> tuple[Any, int]:
    """The run's update counts (``shared.rollout.ppo_update_counts``) and generation batches
    per iteration, for ``train_prompts`` prompts on ``world_size`` processes: what the loop
    and a served critic (its LR schedule's length) both count."""
    ppo = config.ppo
    batches = generation_batches(config, world_size=world_size)
    counts = ppo_update_counts(
        num_prompts=train_prompts * ppo.n_samples_per_prompt, world_size=world_size,
        generation_batch_size=ppo.per_device_generation_batch_size,
        generation_batches=batches,
        training_batch_size=ppo.per_device_training_batch_size, ppo_epochs=ppo.ppo_epochs,
        gradient_accumulation_steps=ppo.gradient_accumulation_steps,
        num_train_epochs=ppo.num_train_epochs, max_iterations=ppo.max_iterations)
    if counts.minibatches_per_iteration % ppo.gradient_accumulation_steps:
        raise ValueError(
            f"ppo.gradient_accumulation_steps: {ppo.gradient_accumulation_steps} does not "
            f"divide the {counts.minibatches_per_iteration} mini-batches of an "
            "iteration (ppo_epochs x rollout rows / per_device_training_batch_size)")
    return counts, batches


class PPOBackend(Protocol):
    """What a backend implements (numpy in, numpy or floats out; all rows on every rank)."""

    tokenizer: Any
    run_logger: RunLogger
    rollout_path: str
    is_main: bool

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                 uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample answers: (tokens [B, N], mask [B, N] 1 up to and including EOS,
        log-probs recorded while sampling [B, N])."""

    def score(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray,
              sample_mask: np.ndarray, *, logprobs: bool = True) -> dict[str, np.ndarray]:
        """logprobs, ref_logprobs, values ([B, N], unmasked) and scores ([B]); with
        ``logprobs`` False no actor forward and no logprobs (``shared.old_logprobs``)."""

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], *,
                   normalizers: list[float], ptx: list[dict[str, np.ndarray]] | None,
                   ptx_normalizers: list[float] | None, kl_coef: float) -> dict[str, float]:
        """One optimiser step of actor and critic (joint ptx when ``ptx`` is given): sums over
        the micro-batches of actor_loss, critic_loss, pg_loss, ptx_loss, tokens and the
        token-weighted ``TOKEN_STATS``; actor_lr, critic_lr of this step; actor_grad_norm,
        critic_grad_norm: the step's global gradient norms before clipping."""

    def ptx_step(self, ptx: list[dict[str, np.ndarray]], *,
                 ptx_normalizers: list[float]) -> dict[str, float]:
        """DeepSpeed-Chat's separate actor step on ``unsup_coef * ptx_loss``: ptx_loss,
        actor_lr."""

    def update_ema(self) -> None: ...

    saves_in_background: bool
    """True when ``save_checkpoint`` returns before the files are on disk."""

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write models, optimisers, EMA, RNG and the loop's JSON-able ``state`` into the new
        directory ``path`` (every process calls it; the loop marks it complete)."""

    def wait_until_saved(self) -> None: ...

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore the complete checkpoint ``path``; the loop's ``state``."""

    def barrier(self) -> None:
        """Wait for every process (a no-op for one)."""

    def export(self, step_dir: Path) -> dict[str, str]:
        """Write ``final/`` (actor), ``critic/`` and ``ema/`` (with EMA) as HF directories;
        their paths as final_model, critic_model, ema_model."""

    def heldout_metrics(self, model: str) -> dict[str, float]:
        """The held-out metric of the "actor" or the "ema" weights ({} for eval.metric none)."""


class PPOLoop:
    """The PPO loop; a backend's ``PPOTrainer`` subclasses it (see ``PPOBackend``).

    A subclass builds its tokenizer, then calls ``_init_loop``, which builds the data and the
    update counts its optimisers need (``self.counts``, ``self.actor_total_steps``), then its
    models.

    Attributes:
      prompt_iterator, ptx_iterator: resumable data iterators.
      iteration, total_iterations, generation_batches.
      kl_state: the KL controller's state (``kl_state.kl_coef``).
      last_metrics: the latest iteration's metrics.
    """

    step = "ppo"
    backend = "unknown"
    """``"torch"`` or ``"jax"`` (set by each backend's trainer): checkpoint manifests record
    it, and a resume refuses a checkpoint another backend wrote."""

    def _init_loop(self, config: RLHFConfig, run_dir: str | Path, *, tokenizer, world_size: int,
                   pad_token_id: int | None = None) -> None:
        self.config, ppo = config, config.ppo
        self.conventions = ppo.conventions
        self.run_dir = Path(run_dir)
        self.step_dir = self.run_dir / self.step
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.data = build_step_data(config.data, tokenizer, "ppo")
        self.generation_rows = ppo.per_device_generation_batch_size * world_size
        self.minibatch_rows = ppo.per_device_training_batch_size * world_size
        self.generation_batches = generation_batches(config, world_size=world_size)
        # the group layout (shared.critic_free): a batch of rows holds rows / n prompts
        self.group_size = ppo.n_samples_per_prompt
        self.models = models_used(config)
        self.reward_function = (load_reward_function(ppo.reward_function)
                                if ppo.reward_function is not None else None)
        self.served = ServedScoring(config, tokenizer)  # docs/serving.md
        self.prompt_iterator = BatchIterator(self.data.train,
                                             self.generation_rows // self.group_size,
                                             seed=config.seed, shuffle=True, drop_last=True,
                                             name="ppo prompts")
        self.counts, _ = ppo_counts(config, train_prompts=len(self.data.train),
                                    world_size=world_size)
        self.total_iterations = (self.counts.total_optimizer_steps
                                 // self.counts.optimizer_steps_per_iteration)
        self.ptx_iterator = None
        self.ptx_mode = None
        if ppo.unsup_coef > 0 and config.data.unsupervised_dataset_name:
            ptx = build_ptx_data(config.data, tokenizer)
            if ptx is not None:
                # One ptx batch per actor optimiser step (DeepSpeed-Chat zips an unsupervised
                # batch with every experience mini-batch).
                rows = self.minibatch_rows * ppo.gradient_accumulation_steps
                self.ptx_iterator = BatchIterator(ptx.train, rows, seed=config.seed,
                                                  shuffle=True, drop_last=len(ptx.train) >= rows,
                                                  name="ppo ptx")
                self.ptx_mode = ppo.ptx_mode
        steps = self.counts.total_optimizer_steps
        self.actor_total_steps = steps * (2 if self.ptx_mode == "separate" else 1)
        self.critic_total_steps = steps
        # a served critic (ppo.critic.url): the backend builds none, this loop sends the
        # critic's micro-batches to its server (docs/serving.md)
        self.has_critic = any(m.split("@")[0] == "critic" for m in self.models)
        self.served_critic = (ServedCritic(config, tokenizer, total_steps=steps,
                                           client=self.served.critic_client)
                              if "critic" not in self.models and self.has_critic else None)
        self.kl_controller = make_kl_controller(self.conventions)
        # conventions.old_logprobs: recomputed by the actor, or the sampler's (checked)
        self.old_logprobs = OldLogprobs(mode=self.conventions.old_logprobs,
                                        max_gap=ppo.old_logprobs_max_gap,
                                        check_interval=ppo.old_logprobs_check_interval)
        self.kl_state = self.kl_controller.init()
        self.guard = NonFiniteGuard("ppo", max_consecutive=config.guard.max_consecutive_skips)
        self._all_short = 0  # iterations in a row whose every answer was too short
        self.iteration = 0
        self.last_valid: Experience | None = None
        self.last_metrics: dict[str, Any] = {}
        self.timer = PhaseTimer()
        self.elapsed: Counter = Counter()
        self._checkpoints: CheckpointDir | None = None
        self._pending: Path | None = None  # saved in the background, not yet complete
        self._saved: int | None = None

    @property
    def ptx_enabled(self) -> bool:
        """Whether PPO trains on a ptx (pretraining) loss too (``ppo.unsup_coef`` > 0 and
        ``data.unsupervised_dataset_name``)."""
        return self.ptx_mode is not None

    # ------------------------------------------------------------ steps 2-4: experience

    def generate_experience(self, prompts: PromptBatch, *, iteration: int | None = None,
                            batch_index: int = 0) -> Experience:
        """Rollout, short-answer rule and scoring of one global prompt batch (advantages are
        set by ``train_on_experience``, over the whole buffer)."""
        iteration = self.iteration if iteration is None else iteration
        ppo = self.config.ppo
        prompts = group_prompts(prompts, self.group_size)
        rows, width = len(prompts), self.config.data.max_answer_seq_len
        uniforms = sampling_uniforms(self.config.seed, iteration, batch_index,
                                     shape=(rows, width))
        prompt_ids = np.asarray(prompts.prompt_input_ids, np.int64)
        prompt_mask = np.asarray(prompts.prompt_attention_mask, np.int64)
        with self.timer.phase("generation"):
            response, sample_mask, sample_logprobs = self.generate(prompt_ids, prompt_mask,
                                                                   uniforms)
        response = np.asarray(response, np.int64)
        sample_mask = np.asarray(sample_mask, np.float32)
        answer_width = int(sample_mask.sum(1).max()) if len(sample_mask) else 0
        if self.conventions.mask_pad_tokens:
            # DeepSpeed-Chat: attention_mask = seq != pad over the whole sequence (a BOS that
            # is the pad, as OPT's with pad = EOS, too) and action_mask = its answer part.
            sample_mask = sample_mask * (response != self.pad_token_id)
            prompt_mask = prompt_mask * (prompt_ids != self.pad_token_id)
        is_short = sample_mask.sum(1) < ppo.min_answer_tokens
        short_answers = int(is_short.sum())
        reused = False
        if ppo.short_answer_policy == "dschat" and is_short.all():
            if self.last_valid is None:
                raise RuntimeError(
                    f"every answer of iteration {iteration} batch {batch_index} is shorter "
                    f"than ppo.min_answer_tokens={ppo.min_answer_tokens} and there is no "
                    "earlier valid rollout to reuse (ppo.short_answer_policy: dschat, as "
                    "DeepSpeed-Chat asserts)")
            logger.warning("iteration %d batch %d: every answer is too short; reusing the last "
                           "valid rollout (scored again at the current weights)", iteration,
                           batch_index)
            last = self.last_valid
            prompt_ids, prompt_mask, response = last.prompt_ids, last.prompt_mask, last.response
            sample_mask, sample_logprobs = last.sample_mask, last.sample_logprobs
            is_short, answer_width = last.is_short, last.answer_width
            reused = True  # its recorded log-probs are of earlier weights: recomputed
        # conventions.old_logprobs rollout: the actor's forward only on check iterations
        skip_actor = {} if reused or self.old_logprobs.recompute(iteration) else {
            "logprobs": False}
        with self.timer.phase("scoring"):
            scored = self.score(prompt_ids, prompt_mask, response, sample_mask, **skip_actor)
            if self.served:
                scored = self.served.fill(scored, prompt_ids, prompt_mask, response,
                                          sample_mask)
            scored = self._with_reward(scored, prompt_ids, prompt_mask, response, sample_mask)
        logprobs, gap = self.old_logprobs.choose(
            sample_logprobs=sample_logprobs, recomputed=scored.get("logprobs"),
            sample_mask=sample_mask, iteration=iteration, stale=reused,
            where=f"ppo iteration {iteration + 1} batch {batch_index}")
        experience = Experience(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response=response,
            sample_mask=sample_mask, sample_logprobs=np.asarray(sample_logprobs, np.float32),
            response_mask=sample_mask * ~is_short[:, None],
            logprobs=logprobs,
            ref_logprobs=np.asarray(scored["ref_logprobs"], np.float32),
            values=np.asarray(scored["values"], np.float32),
            scores=np.asarray(scored["scores"], np.float32), is_short=is_short,
            short_answers=short_answers, answer_width=answer_width)
        experience.logprob_gap = gap
        if ppo.short_answer_policy == "dschat" and not is_short.all():
            self.last_valid = experience
        if ppo.print_answers and iteration % ppo.print_answers_interval == 0:
            self._print_answers(prompts, experience, iteration)
        return experience

    def _with_reward(self, scored: dict[str, np.ndarray], prompt_ids: np.ndarray,
                     prompt_mask: np.ndarray, response: np.ndarray,
                     sample_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The backend's outputs with the run's reward as ``scores`` and zero values without a
        critic: the reward model's end score and ``ppo.reward_function`` on the decoded
        prompt and answer, mixed with their weights (``shared.reward_fn.mix_rewards``)."""
        ppo = self.config.ppo
        out = dict(scored)
        if not self.has_critic:
            out["values"] = np.zeros(response.shape, np.float32)
        function_scores = None
        if self.reward_function is not None:
            prompts, answers = rollout_texts(self.tokenizer, prompt_ids, prompt_mask, response,
                                             sample_mask)  # what a text reward model reads
            function_scores = self.reward_function(prompts, answers)
        model_scores = out.get("scores") if ppo.reward_model_weight != 0 else None
        if function_scores is None:  # the reward model alone, its scores unchanged
            return out
        out["scores"] = mix_rewards(model_scores, function_scores,
                                    model_weight=ppo.reward_model_weight,
                                    function_weight=ppo.reward_function_weight)
        return out

    def with_advantages(self, buffer: list[Experience],
                        kl_coef: float | None = None) -> Experience:
        """One buffer with ``shared.compute_advantages`` (or a critic-free estimator,
        ``shared.critic_free.outcome_advantages``) over every row (whitening over all of
        them) at the controller's coefficient (or ``kl_coef``), then the rollout
        correction (``shared.critic_free.rollout_correction``)."""
        experience = self._advantages(buffer, kl_coef)
        weights, mask = rollout_correction(experience.logprobs, experience.sample_logprobs,
                                           experience.response_mask,
                                           conventions=self.conventions)
        return dataclasses.replace(experience, importance_weights=weights, response_mask=mask)

    def _advantages(self, buffer: list[Experience], kl_coef: float | None) -> Experience:
        c = self.conventions
        beta = float(self.kl_state.kl_coef) if kl_coef is None else kl_coef
        if c.advantage_estimator != "gae":
            exp = Experience.cat(buffer)
            out = outcome_advantages(exp.scores, exp.logprobs, exp.ref_logprobs,
                                     exp.response_mask, conventions=c, kl_coef=beta,
                                     group_size=self.group_size)
            return dataclasses.replace(exp, **out)
        if not c.trim_answer_width:
            exp = Experience.cat(buffer)
            out = compute_advantages(exp.scores, exp.logprobs, exp.ref_logprobs, exp.values,
                                     exp.response_mask, conventions=c, kl_coef=beta)
            return dataclasses.replace(exp, **{k: np.asarray(v, np.float32)
                                               for k, v in out.items()})
        # DeepSpeed-Chat's generate stops once every row has finished: the advantages of
        # each generation batch are computed on its own width (its longest answer), then
        # whitened over the buffer when the conventions whiten.
        parts = []
        unwhitened = dataclasses.replace(c, whiten_advantages=False)
        for exp in buffer:
            full = exp.response.shape[1]
            width = max(exp.answer_width, 1)
            cut = [x[:, :width] for x in (exp.logprobs, exp.ref_logprobs, exp.values,
                                          exp.response_mask)]
            out = compute_advantages(exp.scores, *cut, conventions=unwhitened, kl_coef=beta)
            pad = ((0, 0), (0, full - width))
            parts.append(dataclasses.replace(exp, **{
                k: np.pad(np.asarray(v, np.float32), pad) for k, v in out.items()}))
        experience = Experience.cat(parts)
        if c.whiten_advantages:
            experience.advantages = np.asarray(
                masked_whiten(experience.advantages, experience.response_mask), np.float32)
        return experience

    # ------------------------------------------------------------ steps 5-7: training

    def _ptx_micro_batches(self, group_rows: int, micro: int) -> list[dict] | None:
        if self.ptx_iterator is None:
            return None
        batch: TextBatch = self.ptx_iterator.next_batch()
        if len(batch) != group_rows:  # only when the whole ptx set is smaller than a step
            batch = batch.take(np.arange(group_rows) % len(batch))
        size = group_rows // micro
        return [{"input_ids": np.asarray(batch.input_ids[a * size:(a + 1) * size], np.int64),
                 "attention_mask": np.asarray(batch.attention_mask[a * size:(a + 1) * size],
                                              np.int64)}
                for a in range(micro)]

    def _normalizers(self, masks: list[np.ndarray], mode: str) -> list[float]:
        """One loss normaliser per micro-batch: the step's global count, or (DeepSpeed's
        gradient-accumulation scaling) each micro-batch's own count times their number."""
        if self.conventions.accumulation_scaling == "micro_batch_mean":
            return [float(loss_normalizer(m, mode=mode)) * len(masks) for m in masks]
        total = float(loss_normalizer(np.concatenate(masks), mode=mode))
        return [total] * len(masks)

    def train_on_experience(self, buffer: list[Experience], *,
                            iteration: int | None = None) -> dict[str, Any]:
        """Advantages over the buffer, ``ppo_epochs`` passes of optimiser steps, the KL
        controller update; returns the iteration's metrics."""
        iteration = self.iteration if iteration is None else iteration
        ppo, c = self.config.ppo, self.conventions
        kl_coef = float(self.kl_state.kl_coef)
        experience = self.with_advantages(buffer, kl_coef)
        schedule = minibatch_schedule(len(experience), self.minibatch_rows,
                                      ppo_epochs=ppo.ppo_epochs, shuffle=c.shuffle_minibatches,
                                      seed=self.config.seed, iteration=iteration)
        minibatches = [mb for epoch in schedule for mb in epoch]
        accumulation = ppo.gradient_accumulation_steps
        groups = [minibatches[i:i + accumulation] for i in range(0, len(minibatches), accumulation)]
        where = f"iteration {iteration + 1}"
        # a non-finite score, value or log-prob in the rollout: no step trains on it
        bad_rollout = self._nonfinite_rollout(experience)
        steps: list[dict[str, float]] = []
        if self.served_critic is not None:  # a rank ahead would train the critic server
            self.barrier()  # before another rank has its values at the rollout weights
        with self.timer.phase("training"):
            if bad_rollout:
                self._record_skip(where, [f"rollout {q}" for q in bad_rollout],
                                  steps=len(groups))
                groups = []
            for group in groups:
                micro = [experience.train_arrays(rows) for rows in group]
                normalizers = self._normalizers([m["response_mask"] for m in micro],
                                                c.loss_agg_mode)
                ptx = self._ptx_micro_batches(sum(len(g) for g in group), len(group))
                ptx_normalizers = None
                if ptx is not None:
                    ptx_normalizers = self._normalizers(
                        [m["attention_mask"][:, 1:] for m in ptx], "token-mean")
                joint = ptx if self.ptx_mode == "joint" else None
                # a served critic trains on the same micro-batches while the actor does
                served = (None if self.served_critic is None
                          else self.served_critic.train_step_async(micro, normalizers))
                try:
                    stats = dict(self.train_step(micro, normalizers=normalizers, ptx=joint,
                                                 ptx_normalizers=ptx_normalizers,
                                                 kl_coef=kl_coef))
                finally:  # the critic's request ends before anything else happens
                    if served is not None:
                        futures.wait([served])
                if served is not None:
                    stats.update(served.result())
                if not self.has_critic:  # nothing trained a critic: 0 in the metrics
                    stats = {k: v for k, v in stats.items() if k not in CRITIC_STATS}
                if self.ptx_mode == "separate":
                    stats.update(self.ptx_step(ptx, ptx_normalizers=ptx_normalizers))
                # EMA after every actor optimiser step (DeepSpeed-Chat's moving_average).
                self.update_ema()
                # a non-finite loss or gradient norm: the backend did not apply the step
                problems = nonfinite_values(stats, ("actor_loss", "critic_loss", "ptx_loss",
                                                    "actor_grad_norm", "critic_grad_norm"))
                if not self._record_skip(where, problems):
                    steps.append(stats)
        self._check_answers(experience, where)
        metrics = self._metrics(experience, steps, kl_coef)
        metrics["skipped_steps"] = self.guard.skipped
        if not bad_rollout:
            valid = ~experience.is_short
            self.kl_state = self.kl_controller.update(self.kl_state, current_kl=metrics["kl"],
                                                      n_steps=int(valid.sum()))
        return metrics

    def _check_answers(self, experience: Experience, where: str) -> None:
        """An iteration whose every answer is too short trains nothing: warned about, and
        ``guard.max_consecutive_skips`` of them in a row stop the run."""
        if (~experience.is_short).any():
            self._all_short = 0
            return
        self._all_short += 1
        limit = self.config.ppo.min_answer_tokens
        message = (f"ppo {where}: every answer is shorter than ppo.min_answer_tokens={limit} "
                   f"({self._all_short} iterations in a row): PPO trains on nothing")
        if self._all_short >= self.config.guard.max_consecutive_skips:
            raise RunError(f"{message}; the run stops (guard.max_consecutive_skips: "
                           f"{self.config.guard.max_consecutive_skips}); lower "
                           "ppo.min_answer_tokens or check that the actor ends its answers "
                           "with the tokenizer's EOS")
        logger.warning(message)

    def _record_skip(self, where: str, problems: list[str], steps: int = 1) -> bool:
        latest = None
        if problems:  # the checkpoint to name: a save still in the background counts
            self._commit()
            latest = self.checkpoints.latest()
        return self.guard.record(where, problems, steps=steps, last_checkpoint=latest)

    @staticmethod
    def _nonfinite_rollout(exp: Experience) -> list[str]:
        """The rollout quantities with a NaN or an infinity where the advantages read them
        (every slot up to one past each answer's end)."""
        width = exp.response.shape[1]
        episode = np.arange(width)[None, :] <= exp.sample_mask.sum(1)[:, None]
        return nonfinite_arrays({"scores": exp.scores, "values": exp.values,
                                 "logprobs": exp.logprobs, "ref_logprobs": exp.ref_logprobs},
                                mask=episode)

    def _metrics(self, exp: Experience, steps: list[dict[str, float]],
                 kl_coef: float) -> dict[str, Any]:
        """Rollout statistics over the valid rows; training statistics as the mean over the
        iteration's optimiser steps (token statistics per step over its tokens)."""
        valid = ~exp.is_short
        mask = exp.response_mask
        sequence_kl = (exp.kl * mask).sum(1)
        tokens = max(float(mask.sum()), 1.0)

        def step_mean(key: str) -> float:
            per_step = [s.get(key, 0.0) / (max(s.get("tokens", 0.0), 1.0)
                                           if key in TOKEN_STATS else 1.0) for s in steps]
            return float(np.mean(per_step)) if per_step else 0.0

        metrics = {k: step_mean(k) for k in ("actor_loss", "critic_loss", "pg_loss",
                                              *TOKEN_STATS, "ptx_loss", "actor_grad_norm",
                                              "critic_grad_norm")}
        metrics.update({k: float(steps[-1].get(k, 0.0)) if steps else 0.0 for k in LAST_STEP})
        metrics.update(
            reward_score=float(exp.scores[valid].mean()) if valid.any() else 0.0,
            kl=float(sequence_kl[valid].mean()) if valid.any() else 0.0,
            kl_coef=kl_coef,
            advantages_mean=float((exp.advantages * mask).sum() / tokens),
            returns_mean=float((exp.returns * mask).sum() / tokens),
            response_length=float(exp.response_length.mean()),
            short_answers=exp.short_answers,
            rollout_logprob_gap=exp.logprob_gap,
        )
        if self.conventions.old_logprobs == "rollout":
            metrics.update(self.old_logprobs.metrics())
        if exp.importance_weights is not None:  # TIS: the mean weight over the loss tokens
            metrics["tis_weight_mean"] = float((exp.importance_weights * mask).sum() / tokens)
        if self.conventions.rollout_correction == "mis":  # the share of tokens MIS kept
            offered = (exp.sample_mask * ~exp.is_short[:, None]).sum()
            metrics["mis_kept_fraction"] = float(mask.sum() / max(float(offered), 1.0))
        return metrics

    # ------------------------------------------------------------ checkpoints

    def loop_state(self) -> dict[str, Any]:
        """Everything of the loop an uninterrupted run still has in memory (JSON-able)."""
        self.elapsed.update(self.timer.pop())
        return {
            "iteration": self.iteration,
            "prompt_iterator": self.prompt_iterator.state_dict(),
            "ptx_iterator": None if self.ptx_iterator is None else self.ptx_iterator.state_dict(),
            "kl_coef": float(self.kl_state.kl_coef),
            "last_valid": None if self.last_valid is None else self.last_valid.to_state(),
            "last_metrics": self.last_metrics,
            "elapsed": dict(self.elapsed),
            "guard": {**self.guard.state_dict(), "all_short": self._all_short},
            "old_logprobs": self.old_logprobs.state_dict(),
        }

    @property
    def checkpoints(self) -> CheckpointDir:
        """``<run>/ppo/checkpoints/iter-NNNNNNNN/`` (``shared.checkpoints``)."""
        if self._checkpoints is None:
            self._checkpoints = CheckpointDir(
                self.step_dir / "checkpoints", keep=self.config.logging.keep_checkpoints,
                prefix="iter", is_main=self.is_main, barrier=self.barrier)
        return self._checkpoints

    def save(self) -> None:
        """A resumable checkpoint at the current iteration (marked complete once on disk)."""
        self._commit()
        tag = self.checkpoints.tag(self.iteration)
        path = self.checkpoints.prepare(tag)
        state = self.loop_state()
        if self.served_critic is not None:  # the critic server saves with the same tag
            state["critic_server"] = self.served_critic.save(tag)
        self.save_checkpoint(path, state)
        self._pending, self._saved = path, self.iteration
        if not self.saves_in_background:
            self._commit()

    def _commit(self) -> None:
        if self._pending is not None:
            self.wait_until_saved()
            self.checkpoints.commit(self._pending, backend=self.backend, config=self.config)
            self._pending = None

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint of this step; False when there is
        none."""
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("ppo: no checkpoint in %s; starting from iteration 0",
                        self.checkpoints.root)
            if self.is_main:  # a run killed before its first checkpoint logs it all again
                truncate_metrics(self.run_dir, self.step, "iteration", 0)
            return False
        self.checkpoints.verify(latest, backend=self.backend, config=self.config)
        state = self.load_checkpoint(latest)
        self.iteration = int(state["iteration"])
        self.prompt_iterator.load_state_dict(state["prompt_iterator"])
        if self.ptx_iterator is not None:
            self.ptx_iterator.load_state_dict(state["ptx_iterator"])
        self.kl_state = self.kl_state._replace(kl_coef=state["kl_coef"])
        self.last_valid = (None if state["last_valid"] is None
                           else Experience.from_state(state["last_valid"]))
        self.last_metrics = dict(state["last_metrics"])
        self.elapsed = Counter(state["elapsed"])
        self.guard.load_state_dict(state.get("guard"))
        self._all_short = int((state.get("guard") or {}).get("all_short", 0))
        self.old_logprobs.load_state_dict(state.get("old_logprobs"))
        self._saved = self.iteration
        if self.served_critic is not None:
            self.served_critic.load(state.get("critic_server"), checkpoint=latest)
        logger.info("ppo: resuming from %s", latest)
        if self.is_main:
            truncate_metrics(self.run_dir, self.step, "iteration", self.iteration + 1)
        logger.info("ppo: resumed at iteration %d/%d", self.iteration, self.total_iterations)
        return True

    # ------------------------------------------------------------ the loop

    def train_iteration(self) -> dict[str, Any]:
        """One whole iteration: rollouts, training, KL controller; returns its metrics."""
        buffer = [self.generate_experience(self.prompt_iterator.next_batch(), batch_index=b)
                  for b in range(self.generation_batches)]
        metrics = self.train_on_experience(buffer)
        self.iteration += 1
        times = self.timer.pop()
        self.elapsed.update(times)
        metrics.update({f"{p}_time": round(times.get(f"{p}_time", 0.0), 6) for p in PHASES})
        metrics["rollout_path"] = self.rollout_path
        self.last_metrics = metrics
        return metrics

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Iterate to ``total_iterations``, export, evaluate; returns this step's
        ``summary.json`` entry."""
        if resume:
            self.resume()
        if self.served:
            for key, identity in self.served.wait_until_ready().items():
                logger.info("ppo: %s from the %s server %s (%s backend, model %s)", key,
                            identity.get("role"), self.served.clients[key][0].url,
                            identity.get("backend"), identity.get("model"))
        cfg = self.config.logging
        start = time.perf_counter()
        bar = progress(self.total_iterations, desc="ppo", initial=self.iteration,
                       enabled=cfg.progress_bar and self.is_main)
        on_console = console_every(self.total_iterations, log_interval=cfg.log_interval,
                                   lines=cfg.console_lines)
        try:
            while self.iteration < self.total_iterations:
                started = time.perf_counter()
                metrics = self.train_iteration()
                if (self.iteration % cfg.log_interval == 0
                        or self.iteration == self.total_iterations):
                    self.run_logger.log(self.step, self.iteration, metrics)
                    last = self.iteration == self.total_iterations
                    self._log_lines(metrics, time.perf_counter() - started, console=last or (
                        bool(on_console) and self.iteration % on_console == 0))
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_score']:.3f}",
                                kl=f"{metrics['kl']:.3f}")
                last = self.iteration == self.total_iterations
                if cfg.save_interval and self.iteration % cfg.save_interval == 0 and not last:
                    self.save()
            if self._saved != self.iteration:
                self.save()
            self._commit()
        except BaseException:
            self._settle()
            raise
        finally:
            bar.close()
        return self._finish(time.perf_counter() - start)

    def _settle(self) -> None:
        """On a failure: finish a save still running in the background (a whole state of
        an earlier iteration, so it is marked complete), before the interpreter's exit
        stops the thread writing it; its own failure is only logged."""
        try:
            self._commit()
        except Exception as exc:  # noqa: BLE001 (the failure being raised matters more)
            self._pending = None
            logger.warning("ppo: the checkpoint being saved when the run failed is not "
                           "complete: %s", exc)

    def _finish(self, seconds: float) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        with self.timer.phase("export"):
            paths = self.export(self.step_dir)
            if self.served_critic is not None and self.is_main:  # written by its server
                paths["critic_model"] = self.served_critic.export(self.step_dir / "critic")
            if self.is_main:  # read back: a non-finite or truncated model is never final
                for key, path in paths.items():
                    if Path(path).is_dir():
                        complete_export(path, self._card(key))
                        verify_export(path, complete=True)
        with self.timer.phase("heldout_evaluation"):
            heldout = self.heldout_metrics("actor")
            if heldout:
                entry["heldout"] = heldout
                if paths.get("ema_model"):
                    entry["heldout_ema"] = self.heldout_metrics("ema")
        self.elapsed.update(self.timer.pop())
        timings = {k: round(v, 3) for k, v in sorted(self.elapsed.items())}
        timings["wall_time"] = round(seconds, 3)
        entry.update(paths, data_quality=self.data.quality)
        entry.update(final_reward=self.last_metrics.get("reward_score"),
                     final_kl=self.last_metrics.get("kl"), iterations=self.iteration,
                     rollout_path=self.rollout_path, models=list(self.models),
                     timings=timings)
        self.run_logger.finish_step(self.step, self.iteration, ppo=entry)  # summary, TB, plots/
        logger.info("ppo done: final reward %.4f, final kl %.4f -> %s",
                    entry["final_reward"] or 0.0, entry["final_kl"] or 0.0,
                    entry.get("final_model"))
        return entry

    def _card(self, path_key: str) -> ExportCard:
        """The model card of the export ``path_key`` names (final_model, critic_model,
        ema_model); the base models are the trainer's ``start_models`` (actor, critic)."""
        role = path_key.removesuffix("_model")
        starts = getattr(self, "start_models", {})
        model = self.config.model
        if role == "critic":
            path, fresh, key = starts.get("critic"), model.critic_config, "model.critic_config"
        else:
            path, fresh, key = starts.get("actor"), model.actor_config, "model.actor_config"
        return ExportCard(backend=self.backend, step=self.step, role=role,
                          run_dir=str(self.run_dir),
                          progress=f"iteration {self.iteration} of {self.total_iterations}",
                          base_model=describe_source(path and str(path), fresh, key),
                          config_sha256=config_fingerprint(self.config)[1])

    def _log_lines(self, metrics: dict[str, Any], seconds: float, *,
                   console: bool = True) -> None:
        """DeepSpeed-Chat's step-3 run log (losses, average reward, timings) into the run
        log; with ``console`` also one line of the key figures on the console."""
        nan = float("nan")
        logger.info("epoch: %d|step: %d|ppo_ep: %d|act_loss: %.4f|cri_loss: %.4f|"
                    "unsuper_loss: %.4f", self.prompt_iterator.epoch, self.iteration,
                    self.config.ppo.ppo_epochs, metrics.get("actor_loss", nan),
                    metrics.get("critic_loss", nan), metrics.get("ptx_loss", nan),
                    extra=FILE_ONLY)
        logger.info("average reward score: %.4f|kl: %.4f|kl_coef: %.4g|short answers: %d",
                    metrics["reward_score"], metrics["kl"], metrics.get("kl_coef", nan),
                    metrics.get("short_answers", 0), extra=FILE_ONLY)
        logger.info("iteration %d/%d => latency %.2fs|generation %.2fs|scoring %.2fs|"
                    "training %.2fs", self.iteration, self.total_iterations, seconds,
                    metrics["generation_time"], metrics["scoring_time"],
                    metrics["training_time"], extra=FILE_ONLY)
        if console:
            logger.info("ppo iteration %d/%d|reward: %.4g|kl: %.4g|act_loss: %.4g|%.2fs",
                        self.iteration, self.total_iterations, metrics["reward_score"],
                        metrics["kl"], metrics.get("actor_loss", nan), seconds)

    def _print_answers(self, prompts: PromptBatch, exp: Experience, iteration: int,
                       count: int = 4) -> None:
        if not self.is_main:
            return
        answers = decode_answers(self.tokenizer, exp.response[:count], exp.sample_mask[:count])
        for prompt, answer, score in zip(list(prompts.prompt_text)[:count], answers,
                                         exp.scores[:count], strict=True):
            logger.info("--- iteration %d prompt: %r answer: %r reward: %.3f", iteration,
                        prompt, answer, score)
