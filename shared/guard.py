"""The non-finite guard of both training loops: a NaN or an infinity never reaches the weights.

The backends skip an optimiser step whose gradients are not finite (DeepSpeed's overflow
semantics: no update, no scheduler step, the step counted as skipped; JAX: the update is not
applied) and report its gradient norm as NaN. The loops (``shared.ppo_loop``,
``shared.supervised_loop``) hand every step's losses and gradient norms, and PPO's rollout
scores, values and log-probs, to a :class:`NonFiniteGuard`; it counts the skipped steps
(the ``skipped_steps`` metric), warns naming the quantity, and stops the run after
``guard.max_consecutive_skips`` skipped steps in a row with a message naming the step, the
quantity and the last good checkpoint. PPO skips the training of an iteration whose rollout
holds a non-finite score, value or log-prob.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import RunError

__all__ = ["NonFiniteError", "NonFiniteGuard", "nonfinite_arrays", "nonfinite_values"]

logger = logging.getLogger(__name__)


class NonFiniteError(RunError):
    """Too many optimiser steps in a row saw a non-finite number; the run stops (exit 1)."""


def nonfinite_values(values: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The names among ``keys`` whose value in ``values`` is NaN or infinite."""
    return [k for k in keys if k in values and not math.isfinite(float(values[k]))]


def nonfinite_arrays(arrays: Mapping[str, np.ndarray], mask: np.ndarray | None = None
                     ) -> list[str]:
    """The names of the arrays with a NaN or an infinity (where ``mask`` is true, when given:
    a rollout's padding slots may hold anything)."""
    bad = []
    for name, array in arrays.items():
        array = np.asarray(array)
        finite = np.isfinite(array)
        if mask is not None and array.shape == mask.shape:
            finite = finite | ~mask
        if not finite.all():
            bad.append(name)
    return bad


class NonFiniteGuard:
    """Counts skipped optimiser steps of one training step (sft, reward, ppo) and stops the
    run after ``max_consecutive`` in a row.

    Args:
      step: "sft", "reward" or "ppo" (named in messages).
      max_consecutive: ``guard.max_consecutive_skips``.
    """

    def __init__(self, step: str, *, max_consecutive: int):
        self.step = step
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def record(self, where: str, problems: list[str], *, steps: int = 1,
               last_checkpoint: Path | None = None) -> bool:
        """Record ``steps`` optimiser steps at ``where`` (e.g. "iteration 12"), skipped when
        ``problems`` (the non-finite quantities) is not empty; returns whether they were.
        They count ``steps`` towards ``skipped`` and one skip towards the ones in a row (a
        PPO rollout that cannot be trained on is one skip, however many steps it feeds).

        Raises:
          NonFiniteError: the skipped steps in a row reached ``max_consecutive``.
        """
        if not problems:
            self.consecutive = 0
            return False
        self.skipped += steps
        self.consecutive += 1
        what = ", ".join(problems)
        logger.warning("%s %s: non-finite %s; %d optimiser step(s) skipped (%d skips in a "
                       "row, guard.max_consecutive_skips: %d)", self.step, where, what, steps,
                       self.consecutive, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            resume = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                      else "no checkpoint was written yet")
            raise NonFiniteError(
                f"{self.step} {where}: {what} not finite, {self.consecutive} skips in a row "
                f"(guard.max_consecutive_skips: {self.max_consecutive}); the run "
                f"stops before a non-finite number reaches the weights; {resume}")
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
