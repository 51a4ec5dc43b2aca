"""Held-out evaluation shared by both backends: decode answers, score them.

A backend generates answer tokens for the eval prompts (greedy, and sampled
with ``eval.samples_per_prompt`` answers per prompt); this module turns the
token arrays into text the same way for both and computes the configured
metric, so the two backends' ``summary.json`` figures mean the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from shared.data.demo import arithmetic_accuracy
from shared.rollout import sampling_uniforms

__all__ = ["HELDOUT_ITERATION", "METRICS", "decode_answers", "heldout_uniforms", "score_answers"]

HELDOUT_ITERATION = 2**32 - 1
"""The ``iteration`` key of ``shared.sampling_uniforms`` for held-out evaluation: no PPO
iteration reaches it, so evaluation randomness never repeats a rollout's."""

# name -> fn(prompts, completions) -> float; "none" is handled by the caller.
METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "arithmetic_accuracy": arithmetic_accuracy,
}


def heldout_uniforms(seed: int, *, rows: int, max_new_tokens: int) -> np.ndarray:
    """The sampling uniforms of held-out evaluation, ``[rows, max_new_tokens]`` float32.

    Rows are prompt-major: row ``i * samples_per_prompt + s`` drives sample s of prompt i.
    Both backends take their rows from this one array (torch: its rank's rows; JAX: rows
    ``start:start + chunk`` per generation chunk), so the figure does not depend on the
    number of ranks, the chunk size or when the evaluation runs. The first r rows do not
    depend on ``rows`` (numbers are drawn row-major), so padding rows may be asked for.
    """
    return sampling_uniforms(seed, HELDOUT_ITERATION, 0, shape=(rows, max_new_tokens))


def decode_answers(tokenizer, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    """Text of each answer: tokens up to (not including) the first EOS, specials removed."""
    response_ids = np.asarray(response_ids)
    response_mask = np.asarray(response_mask).astype(bool)
    eos = tokenizer.eos_token_id
    out = []
    for ids, mask in zip(response_ids, response_mask, strict=True):
        ids = ids[mask]
        if eos is not None:
            ends = np.flatnonzero(ids == eos)
            if ends.size:
                ids = ids[: ends[0]]
        out.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return out


def score_answers(metric: str, prompts: Sequence[str], completions: Sequence[str]) -> float:
    """The value of ``metric`` on (prompt, completion) pairs; errors name the metric."""
    if metric not in METRICS:
        raise ValueError(f"eval.metric: {metric!r} is not one of {sorted(METRICS)}")
    return METRICS[metric](prompts, completions)
