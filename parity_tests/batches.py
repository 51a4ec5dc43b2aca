"""numpy batches for the parity levels: synthetic ones (tests) and ones cut from real data (CLI).

Every batch is a dict of numpy arrays with the keys an objective in `objectives.py` reads.
Padding positions hold `pad_token_id`, as the data layer writes them. `padding` is "right"
(real tokens first) or "left" (padding first); a rollout batch always has both: a left-padded
prompt followed by a right-padded answer (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import shared
from shared.presets import PPOConventions

__all__ = [
    "PADDINGS",
    "forward_batch",
    "pairwise_batch",
    "ranking_batch",
    "rollout_batch",
    "rows_of",
    "sft_batch",
    "synthetic_answers",
    "text_batch",
]

PADDINGS = ("right", "left")
PAD, EOS = 0, 2
FIRST_TOKEN = 3  # synthetic ids avoid pad/bos/eos


def _mask(lengths: list[int], width: int, padding: str) -> np.ndarray:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    t = np.arange(width)[None, :]
    n = np.asarray(lengths)[:, None]
    mask = t < n if padding == "right" else t >= width - n
    return mask.astype(np.int64)


def _ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    return rng.integers(FIRST_TOKEN, vocab, shape).astype(np.int64)


def forward_batch(vocab: int, padding: str, *, seed: int = 0, width: int = 10
                  ) -> dict[str, np.ndarray]:
    """input_ids, attention_mask [3, width]: one full row and two padded ones (at least two
    real tokens each: outputs at padding positions are not compared, see docs/parity.md)."""
    rng = np.random.default_rng(seed)
    mask = _mask([width, max(2, width - 3), max(2, width - 6)], width, padding)
    ids = np.where(mask == 1, _ids(rng, (3, width), vocab), PAD)
    return {"input_ids": ids, "attention_mask": mask}


def sft_batch(vocab: int, padding: str, *, seed: int = 0, width: int = 10,
              prompt_tokens: int = 3) -> dict[str, np.ndarray]:
    """`forward_batch` plus loss_mask: real tokens after the first `prompt_tokens` of a row."""
    batch = forward_batch(vocab, padding, seed=seed, width=width)
    mask = batch["attention_mask"]
    rank = np.cumsum(mask, axis=-1)  # 1-based index among real tokens
    batch["loss_mask"] = ((mask == 1) & (rank > prompt_tokens)).astype(np.int64)
    return batch


def text_batch(vocab: int, padding: str, *, seed: int = 0, width: int = 10
               ) -> dict[str, np.ndarray]:
    """Unsupervised (ptx) blocks: input_ids, attention_mask."""
    return forward_batch(vocab, padding, seed=seed + 7, width=width)


def pairwise_batch(vocab: int, padding: str, *, seed: int = 0, width: int = 10,
                   prompt_tokens: int = 4) -> dict[str, np.ndarray]:
    """Chosen and rejected sequences sharing a prompt, with different answer lengths."""
    rng = np.random.default_rng(seed + 1)
    lengths_c, lengths_r = [width, width - 2, width - 4], [width - 1, width, width - 5]
    out = {}
    prompt = _ids(rng, (3, prompt_tokens), vocab)
    for name, lengths in (("chosen", lengths_c), ("rejected", lengths_r)):
        answer = _ids(rng, (3, width - prompt_tokens), vocab)
        real = np.concatenate([prompt, answer], axis=1)  # [3, width], real tokens first
        mask = _mask(lengths, width, padding)
        ids = np.full_like(real, PAD)
        for row, n in enumerate(lengths):  # place the row's n real tokens where mask is 1
            ids[row, mask[row] == 1] = real[row, :n]
        out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids, mask
    return out


def ranking_batch(vocab: int, padding: str, *, seed: int = 0, width: int = 10, k: int = 3
                  ) -> dict[str, np.ndarray]:
    """input_ids, attention_mask [2, k, width] and num_valid [2] = (k, k - 1); the invalid
    answer is all padding, as `shared.data.RankingBatch` stores it."""
    rng = np.random.default_rng(seed + 2)
    lengths = [[width - i for i in range(k)], [width - 2 - i for i in range(k)]]
    num_valid = np.array([k, k - 1])
    mask = np.stack([_mask(row, width, padding) for row in lengths])  # [2, k, width]
    mask[1, k - 1] = 0
    ids = np.where(mask == 1, _ids(rng, (2, k, width), vocab), PAD)
    return {"input_ids": ids, "attention_mask": mask, "num_valid": num_valid}


def synthetic_answers(vocab: int, batch: int, length: int, *, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(answers [B, A], response_mask [B, A]): rows of different lengths, most ending with
    EOS, pad after the end, as a sampler returns them."""
    rng = np.random.default_rng(seed + 3)
    ends = [length] + [max(1, length - 1 - (i % length)) for i in range(1, batch)]
    mask = _mask(ends, length, "right")
    answers = np.where(mask == 1, _ids(rng, (batch, length), vocab), PAD)
    for row, n in enumerate(ends):
        if n < length:
            answers[row, n - 1] = EOS
    return answers, mask


def rollout_batch(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    answers: np.ndarray,
    response_mask: np.ndarray,
    *,
    actor_logprobs: np.ndarray,
    critic_values: np.ndarray,
    conventions: PPOConventions,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A PPO mini-batch as the trainer builds it, from a rollout and its scoring.

    The rollout quantities are the actor's and critic's own outputs (from the reference
    backend) perturbed so that the PPO ratio and value clips bind on some tokens, rewards come
    from `shared.compute_advantages` under `conventions`, and the normaliser is twice the
    local token count (as if this were one of two micro-batches).

    Args:
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      answers, response_mask: [B, A] right-padded answers.
      actor_logprobs: [B, A] log-probs of the answers under the actor.
      critic_values: [B, A] V(x, y_<t) of the critic.
    """
    rng = np.random.default_rng(seed + 4)
    mask = response_mask.astype(np.float32)
    shape = answers.shape

    def noisy(x: np.ndarray, std: float) -> np.ndarray:
        return ((x + rng.normal(0.0, std, shape)) * mask).astype(np.float32)

    old_logprobs = noisy(actor_logprobs, 0.15)
    ref_logprobs = noisy(actor_logprobs, 0.3)
    old_values = noisy(critic_values, 0.2)
    scores = rng.normal(0.0, 1.0, shape[0]).astype(np.float32)
    adv = shared.compute_advantages(scores, old_logprobs, ref_logprobs, old_values, mask,
                                    conventions=conventions)
    normalizer = 2 * shared.loss_normalizer(mask, mode=conventions.loss_agg_mode)
    return {
        "sequences": np.concatenate([prompt_ids, answers], axis=1),
        "attention_mask": np.concatenate([prompt_mask, response_mask], axis=1),
        "response_mask": mask,
        "old_logprobs": old_logprobs,
        "ref_logprobs": ref_logprobs,
        "old_values": old_values,
        "advantages": adv["advantages"].astype(np.float32),
        "returns": adv["returns"].astype(np.float32),
        "normalizer": np.asarray(normalizer, np.float32),
    }


def rows_of(batch: Any, n: int) -> dict[str, np.ndarray]:
    """The first `n` examples of a `shared.data` batch as a dict of int64 arrays."""
    return {k: np.asarray(v[:n]).astype(np.int64) for k, v in batch.arrays().items()
            if np.asarray(v).dtype.kind in "iu"}
