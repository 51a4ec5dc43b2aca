"""Which old log-probs an iteration trains on: recomputed by the actor's forward, or the ones
the sampler recorded (``conventions.old_logprobs``), and when the latter are checked.

The PPO ratio's old log-probs are the rollout policy's. Both samplers record
``log_softmax`` of the raw (temperature 1, unfiltered) logits of the weights they sample
with, which is what the training forward computes: on the same weights in fp32 the two
agree to ~1e-6, so "rollout" can skip the actor's scoring forward (one of the four).
They differ where the sampler's numerics do (``ppo.rollout_dtype`` bfloat16, bf16 KV
caches, a Hybrid Engine's inference kernels): every ``ppo.old_logprobs_check_interval``
iterations (and at the first) the forward runs anyway, the gap (max |recorded -
recomputed| over the answer tokens) is measured, and one above ``ppo.old_logprobs_max_gap``
switches the run to "recompute" for good, with a warning naming both.

``OldLogprobs`` holds that decision for ``shared.ppo_loop``; it is part of the loop's
checkpointed state, so a resumed run does not go back to the recorded log-probs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["OldLogprobs"]

logger = logging.getLogger(__name__)


class OldLogprobs:
    """The old-log-prob rule of a run.

    Args:
      mode: ``conventions.old_logprobs``, "recompute" or "rollout".
      max_gap: ``ppo.old_logprobs_max_gap``.
      check_interval: ``ppo.old_logprobs_check_interval`` (iterations).
    """

    def __init__(self, *, mode: str, max_gap: float, check_interval: int):
        if mode not in ("recompute", "rollout"):
            raise ValueError(f"old_logprobs: {mode!r} is not recompute or rollout")
        self.mode, self.max_gap, self.check_interval = mode, max_gap, check_interval
        self.fell_back_at: int | None = None
        """The iteration whose check found the gap over the bound (None: it never did)."""
        self.last_gap = 0.0
        """The latest measured gap (0 before any)."""
        self.measured = False
        """Whether the latest `choose` measured the gap (False: it reported ``last_gap``)."""

    @property
    def uses_rollout(self) -> bool:
        """Whether the iterations train on the recorded log-probs (rollout, not fallen back)."""
        return self.mode == "rollout" and self.fell_back_at is None

    def recompute(self, iteration: int) -> bool:
        """Whether the scoring of ``iteration`` runs the actor's forward: always under
        "recompute" or after a fallback, else on the check iterations."""
        return not self.uses_rollout or iteration % self.check_interval == 0

    def choose(self, *, sample_logprobs: np.ndarray, recomputed: np.ndarray | None,
               sample_mask: np.ndarray, iteration: int, where: str,
               stale: bool = False) -> tuple[np.ndarray, float]:
        """The old log-probs ``[B, N]`` to train on and the measured gap (the last measured
        one when ``recomputed`` is None). A gap over the bound falls back (this batch
        already trains on ``recomputed``). ``stale``: the rollout was sampled at earlier
        weights (a reused batch), so ``recomputed`` is trained on and no fallback follows."""
        if recomputed is None:
            if not self.uses_rollout:
                raise RuntimeError(f"{where}: old_logprobs recompute needs the actor's "
                                   "log-probs from the backend's score")
            self.measured = False
            return np.asarray(sample_logprobs, np.float32), self.last_gap
        self.measured = True
        recomputed = np.asarray(recomputed, np.float32)
        gap = np.abs(np.asarray(sample_logprobs, np.float32) - recomputed) * sample_mask
        self.last_gap = float(gap.max()) if gap.size else 0.0
        if stale or not self.uses_rollout:
            return recomputed, self.last_gap
        if self.last_gap > self.max_gap:
            self.fell_back_at = iteration
            logger.warning(
                "%s: the sampler's log-probs are %.3g from the training forward's (max over "
                "the answer tokens), over ppo.old_logprobs_max_gap %.3g: "
                "conventions.old_logprobs rollout falls back to recompute for the rest of "
                "the run", where, self.last_gap, self.max_gap)
            return recomputed, self.last_gap
        return np.asarray(sample_logprobs, np.float32), self.last_gap

    def metrics(self) -> dict[str, float]:
        """``old_logprobs_recomputed``: 1 while the run recomputes (always under
        "recompute"), 0 while it trains on the recorded log-probs;
        ``rollout_logprob_gap_measured``: 1 when this iteration measured
        ``rollout_logprob_gap``, 0 when the figure is the last check's."""
        return {"old_logprobs_recomputed": 0.0 if self.uses_rollout else 1.0,
                "rollout_logprob_gap_measured": 1.0 if self.measured else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"fell_back_at": self.fell_back_at, "last_gap": self.last_gap}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.fell_back_at = state.get("fell_back_at")
        self.last_gap = float(state.get("last_gap", 0.0))
