"""The rollout buffer of the PPO loop: host (numpy) arrays of every rollout row.

Shapes: B rows, P = ``data.max_prompt_seq_len`` (left-padded prompts), N =
``data.max_answer_seq_len``. Every ``[B, N]`` array is response-aligned: index t is answer
token t; ``logprobs[t] = log pi(y_t | x, y_<t)`` and ``values[t] = V(x, y_<t)``.

The backends fill the model outputs (``PPOBackend.generate`` / ``score``); everything else
is set by ``shared.ppo_loop``. Arrays are numpy on every rank (each rank holds all rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Experience", "TRAIN_FIELDS"]

TRAIN_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask", "response_mask",
                "logprobs", "ref_logprobs", "values", "advantages", "returns")
"""The per-row arrays a training step reads (``PPOBackend.train_step``'s micro-batches)."""


@dataclasses.dataclass
class Experience:
    """A scored rollout batch (and, once the loop set them, its advantages).

    Attributes:
      prompt_ids, prompt_mask: [B, P] int64 / int64, left-padded prompts.
      response: [B, N] int64 sampled tokens (pad after the end).
      sample_mask: [B, N] float32, the answer's attention mask in every forward: 1 up to and
        including EOS (with ``conventions.mask_pad_tokens``, 0 on tokens equal to the pad id).
      sample_logprobs: [B, N] float32 log-probs recorded while sampling.
      response_mask: [B, N] float32 loss mask: ``sample_mask`` with too-short rows zeroed.
      logprobs, ref_logprobs, values: [B, N] float32 training-forward log-probs, reference
        log-probs and critic values at the rollout weights, NOT masked: every slot as the
        forward computed it (DeepSpeed-Chat keeps the one-past-the-end slot; the conventions
        decide what is masked, inside ``shared.compute_advantages``).
      scores: [B] float32 reward-model end scores.
      is_short: [B] bool, answers shorter than ``ppo.min_answer_tokens``.
      advantages, returns, kl, token_rewards: [B, N] float32 from ``compute_advantages``.
      short_answers: short answers generated for this batch (a reused batch still counts
        the ones generated).
      logprob_gap: max |sample_logprobs - logprobs| over the answer tokens.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response: np.ndarray
    sample_mask: np.ndarray
    sample_logprobs: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    ref_logprobs: np.ndarray
    values: np.ndarray
    scores: np.ndarray
    is_short: np.ndarray
    advantages: np.ndarray | None = None
    returns: np.ndarray | None = None
    kl: np.ndarray | None = None
    token_rewards: np.ndarray | None = None
    importance_weights: np.ndarray | None = None
    """[B, N] float32 TIS weights of the policy loss (``conventions.rollout_correction``
    "tis"); None without them, and then no micro-batch carries the key."""
    short_answers: int = 0
    logprob_gap: float = 0.0
    answer_width: int = 0
    """Slots the sampler filled: its longest answer, EOS included even where the pad mask
    takes it out (what DeepSpeed-Chat's `generate` returns; ``trim_answer_width``)."""

    ROW_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask", "sample_logprobs",
                  "response_mask", "logprobs", "ref_logprobs", "values", "scores", "is_short",
                  "advantages", "returns", "kl", "token_rewards", "importance_weights")

    def __len__(self) -> int:
        return self.response.shape[0]

    @property
    def response_length(self) -> np.ndarray:
        """[B] answer tokens as the forwards saw them (EOS included unless masked as pad)."""
        return self.sample_mask.sum(1)

    def take(self, rows: np.ndarray | slice) -> Experience:
        """The rows ``rows`` of every per-row array."""
        return dataclasses.replace(self, **{
            f: getattr(self, f)[rows] for f in self.ROW_FIELDS if getattr(self, f) is not None})

    def train_arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The training fields of ``rows`` (a mini-batch), float arrays as float32."""
        out = {}
        optional = ("importance_weights",) if self.importance_weights is not None else ()
        for f in TRAIN_FIELDS + optional:
            x = getattr(self, f)[rows]
            out[f] = x.astype(np.float32) if x.dtype.kind == "f" else x
        return out

    @staticmethod
    def cat(batches: list[Experience]) -> Experience:
        """One buffer from several generation batches (rows in order)."""
        fields: dict[str, Any] = {}
        for f in Experience.ROW_FIELDS:
            parts = [getattr(b, f) for b in batches]
            fields[f] = None if any(p is None for p in parts) else np.concatenate(parts)
        return Experience(**fields, short_answers=sum(b.short_answers for b in batches),
                          logprob_gap=max(b.logprob_gap for b in batches),
                          answer_width=max(b.answer_width for b in batches))

    def to_state(self) -> dict[str, Any]:
        """A JSON-able dict (checkpoints): every array as a nested list with its dtype."""
        state: dict[str, Any] = {"short_answers": self.short_answers,
                                 "logprob_gap": self.logprob_gap,
                                 "answer_width": self.answer_width}
        for f in self.ROW_FIELDS:
            x = getattr(self, f)
            state[f] = None if x is None else {"dtype": str(x.dtype), "data": x.tolist()}
        return state

    @staticmethod
    def from_state(state: dict[str, Any]) -> Experience:
        """Inverse of ``to_state``."""
        fields = {f: None if state.get(f) is None else
                  np.asarray(state[f]["data"], dtype=state[f]["dtype"])
                  for f in Experience.ROW_FIELDS}
        return Experience(**fields, short_answers=int(state["short_answers"]),
                          logprob_gap=float(state["logprob_gap"]),
                          answer_width=int(state["answer_width"]))
