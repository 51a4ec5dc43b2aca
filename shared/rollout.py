"""Framework-free pieces of the PPO loop that both backends must do identically.

- ``sampling_uniforms``: the random numbers a rollout samples with, drawn from
  numpy's counter-based PCG64 keyed by (seed, iteration, batch), so the torch
  and JAX samplers see the same numbers and a resumed run sees the numbers an
  uninterrupted run would have.
- ``minibatch_schedule``: which rollout rows form each PPO mini-batch in each
  of the ``ppo_epochs`` passes.
- ``short_answer_mask``: the documented rule for too-short answers.
- ``ppo_update_counts``: optimiser steps per iteration, for the LR schedules.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shared._array import Array, as_float, namespace

__all__ = [
    "UpdateCounts",
    "minibatch_schedule",
    "ppo_update_counts",
    "sampling_uniforms",
    "short_answer_mask",
]


def sampling_uniforms(seed: int, iteration: int, batch: int, *, shape: tuple[int, ...],
                      rank: int = 0) -> np.ndarray:
    """Uniforms in [0, 1) (float32) for generation batch ``batch`` of PPO ``iteration``.

    Keyed, not sequential: the numbers depend only on (seed, iteration, batch,
    rank), never on how many were drawn before, which is what makes resume exact.
    """
    key = np.random.SeedSequence([seed, iteration, batch, rank, 0x5A4D])
    return np.random.Generator(np.random.PCG64(key)).random(shape, dtype=np.float32)


def minibatch_schedule(num_rows: int, minibatch_size: int, *, ppo_epochs: int, shuffle: bool,
                       seed: int = 0, iteration: int = 0) -> list[list[np.ndarray]]:
    """Row indices of each mini-batch, per PPO epoch: ``[epoch][minibatch] -> int64[M]``.

    ``shuffle=False`` walks the buffer in order every epoch (DeepSpeed-Chat's first
    epoch; it reorders whole micro-batches with ``random.shuffle`` after each epoch);
    with ``shuffle=True`` each epoch is a fresh seeded permutation.
    ``num_rows`` must be a multiple of ``minibatch_size`` (the config checks
    generation and training batch sizes; nothing is dropped silently).
    """
    if minibatch_size < 1 or num_rows % minibatch_size:
        raise ValueError(f"{num_rows} rollout rows do not split into mini-batches of "
                         f"{minibatch_size}")
    schedule = []
    for epoch in range(ppo_epochs):
        if shuffle:
            key = np.random.SeedSequence([seed, iteration, epoch, 0x9B5])
            order = np.random.Generator(np.random.PCG64(key)).permutation(num_rows)
        else:
            order = np.arange(num_rows)
        schedule.append([order[i:i + minibatch_size].astype(np.int64)
                         for i in range(0, num_rows, minibatch_size)])
    return schedule


def short_answer_mask(response_mask: Array, *, min_tokens: int) -> tuple[Array, Array]:
    """Zero the response mask of answers with fewer than ``min_tokens`` tokens.

    The "mask" rule of ``ppo.short_answer_policy``: a too-short answer stays
    in the batch (static shapes, same rows on every rank) but contributes no
    loss and no advantage. Returns ``(mask [B, T], is_short [B] bool)``; the
    trainer reports ``is_short.sum()`` as ``short_answers`` every iteration.
    """
    xp = namespace(response_mask)
    mask = as_float(xp, response_mask, xp.float32)
    is_short = xp.sum(mask, axis=-1) < min_tokens
    return mask * xp.astype(~is_short, mask.dtype)[:, None], is_short


class UpdateCounts(NamedTuple):
    minibatches_per_iteration: int
    optimizer_steps_per_iteration: int
    total_optimizer_steps: int


def ppo_update_counts(*, num_prompts: int, world_size: int, generation_batch_size: int,
                      generation_batches: int, training_batch_size: int, ppo_epochs: int,
                      gradient_accumulation_steps: int, num_train_epochs: int,
                      max_iterations: int | None = None) -> UpdateCounts:
    """Optimiser-step counts of a PPO run (the LR schedules' ``total_steps``).

    An iteration consumes ``generation_batches`` batches of
    ``generation_batch_size`` prompts per rank, then trains ``ppo_epochs``
    passes in mini-batches of ``training_batch_size`` per rank. ``max_iterations``, when
    given, is the number of iterations (the prompts cycle through as many epochs as it takes)
    and ``num_train_epochs`` is ignored, as HF/TRL's max_steps overrides epochs.
    """
    rows = generation_batch_size * generation_batches
    minibatches = ppo_epochs * rows // training_batch_size
    steps = max(1, minibatches // gradient_accumulation_steps)
    prompts_per_iteration = rows * world_size
    if max_iterations is not None:
        iterations = max_iterations
    else:
        iterations = num_train_epochs * max(1, num_prompts // prompts_per_iteration)
    return UpdateCounts(minibatches, steps, steps * iterations)
