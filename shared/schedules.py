"""Learning-rate schedules as pure `step -> lr` functions (optax-style).

Each schedule accepts a Python int (the torch trainer loop) or an integer/float array
step (JAX, under jit) and gives the same value, computed in float64 where the
namespace has it. The multipliers follow `transformers.get_scheduler` exactly
(optimization.py), with s = step, w = warmup_steps, N = total_steps:

  warmup (s < w)   s / max(1, w)
  constant         1
  linear           max(0, (N - s) / max(1, N - w))
  cosine           0.5 * (1 + cos(pi * (s - w) / max(1, N - w)))   (num_cycles = 0.5)

With min_lr_ratio = r the decay phase becomes r + (1 - r) * multiplier (transformers'
`cosine_with_min_lr` with min_lr_rate = r; r = 0 is the plain schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from shared._array import namespace, widest_float

Schedule = Callable[[Any], Any]
SCHEDULE_NAMES = ("constant", "constant_with_warmup", "linear", "cosine")


class _PythonOps:
    """Scalar math on Python floats, mirroring `_ArrayOps`."""

    pi = math.pi

    @staticmethod
    def to_float(step: Any) -> float:
        return float(step)

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return max(a, b)

    @staticmethod
    def cos(x: float) -> float:
        return math.cos(x)


class _ArrayOps:
    """The same operations on arrays of one namespace."""

    pi = math.pi

    def __init__(self, step: Any):
        self.xp = namespace(step)
        self.dtype = (
            step.dtype if self.xp.isdtype(step.dtype, "real floating") else widest_float(self.xp)
        )

    def to_float(self, step: Any) -> Any:
        return self.xp.astype(step, self.dtype)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        a = self.xp.asarray(a, dtype=self.dtype) if isinstance(a, (int, float)) else a
        b = self.xp.asarray(b, dtype=self.dtype) if isinstance(b, (int, float)) else b
        return self.xp.where(cond, a, b)

    def maximum(self, a: Any, b: float) -> Any:
        return self.xp.maximum(a, self.xp.asarray(b, dtype=self.dtype))

    def cos(self, x: Any) -> Any:
        return self.xp.cos(x)


def _ops(step: Any) -> Any:
    if isinstance(step, (int, float)):
        return _PythonOps
    return _ArrayOps(step)


def _check(base_lr: float, warmup_steps: int, total_steps: int | None, min_lr_ratio: float):
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if total_steps is not None and total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def constant_schedule(*, base_lr: float, warmup_steps: int = 0) -> Schedule:
    """lr(s) = base_lr * (s / max(1, w) if s < w else 1).

    Source: transformers `get_constant_schedule_with_warmup` (w = 0: `get_constant_schedule`).
    """
    _check(base_lr, warmup_steps, None, 0.0)

    def schedule(step: Any) -> Any:
        ops = _ops(step)
        s = ops.to_float(step)
        return base_lr * ops.where(s < warmup_steps, s / max(1, warmup_steps), 1.0)

    return schedule


def linear_schedule(
    *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warmup, then linear decay to min_lr_ratio * base_lr at total_steps.

    lr(s) = base_lr * (s / max(1, w) if s < w else r + (1 - r) max(0, (N - s) / max(1, N - w))).

    Source: transformers `get_linear_schedule_with_warmup` (r = 0).
    """
    _check(base_lr, warmup_steps, total_steps, min_lr_ratio)

    def schedule(step: Any) -> Any:
        ops = _ops(step)
        s = ops.to_float(step)
        decay = ops.maximum((total_steps - s) / max(1, total_steps - warmup_steps), 0.0)
        if min_lr_ratio:
            decay = min_lr_ratio + (1.0 - min_lr_ratio) * decay
        return base_lr * ops.where(s < warmup_steps, s / max(1, warmup_steps), decay)

    return schedule


def cosine_schedule(
    *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warmup, then half a cosine from base_lr down to min_lr_ratio * base_lr.

    lr(s) = base_lr * (s / max(1, w) if s < w else r + (1 - r) 0.5 (1 + cos(pi p))),
    p = (s - w) / max(1, N - w) (not clipped past N, as in transformers).

    Source: transformers `get_cosine_schedule_with_warmup` (r = 0) and
    `get_cosine_with_min_lr_schedule_with_warmup` (min_lr_rate = r).
    """
    _check(base_lr, warmup_steps, total_steps, min_lr_ratio)

    def schedule(step: Any) -> Any:
        ops = _ops(step)
        s = ops.to_float(step)
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        decay = 0.5 * (1.0 + ops.cos(ops.pi * 0.5 * 2.0 * progress))
        if min_lr_ratio:
            decay = decay * (1.0 - min_lr_ratio) + min_lr_ratio
        decay = ops.maximum(decay, 0.0)
        return base_lr * ops.where(s < warmup_steps, s / max(1, warmup_steps), decay)

    return schedule


def make_schedule(
    name: str,
    *,
    base_lr: float,
    warmup_steps: int = 0,
    total_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """Build a schedule by its transformers.get_scheduler name.

    Names: constant (no warmup, as transformers' "constant"), constant_with_warmup,
    linear, cosine. min_lr_ratio applies to linear and cosine only.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"name must be one of {list(SCHEDULE_NAMES)}, got {name!r}")
    if name == "constant":
        return constant_schedule(base_lr=base_lr)
    if name == "constant_with_warmup":
        return constant_schedule(base_lr=base_lr, warmup_steps=warmup_steps)
    builder = linear_schedule if name == "linear" else cosine_schedule
    return builder(
        base_lr=base_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
    )
