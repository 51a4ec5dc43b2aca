"""Deterministic index arithmetic: step partitions, eval hold-out, reweighting, shuffling.

All randomness comes from `numpy.random.RandomState`, whose streams numpy keeps stable across
versions, so a seed gives the same split on every machine and for both backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def permutation(n: int, seed: int | Sequence[int]) -> np.ndarray:
    """A seeded permutation of range(n) as int64 (DeepSpeed-Chat's `get_shuffle_idx` draws
    the same permutation from `RandomState(seed).shuffle`)."""
    order = np.arange(n, dtype=np.int64)
    np.random.RandomState(seed).shuffle(order)
    return order


def split_sizes(n: int, shares: Sequence[float]) -> list[int]:
    """Sizes of contiguous parts of n items in proportion to `shares`.

    Boundaries are the rounded cumulative shares, `b_k = floor(n * sum(shares[:k+1]) / total
    + 0.5)`, so sizes sum to n, a zero share gets zero items and no size is negative.
    DeepSpeed-Chat rounds each share on its own and shifts the boundaries to fix the sum; for
    shares like 2,4,4 the two agree, but its shift can hand items to a zero share.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    total = float(sum(shares))
    if any(s < 0 for s in shares) or total <= 0:
        raise ValueError(f"shares must be non-negative with a positive sum, got {list(shares)}")
    bounds = [0]
    running = 0.0
    for share in shares:
        running += share
        bounds.append(int(np.floor(n * running / total + 0.5)))
    bounds[-1] = n
    return [bounds[k + 1] - bounds[k] for k in range(len(shares))]


def partition(n: int, shares: Sequence[float], seed: int) -> list[np.ndarray]:
    """Disjoint index sets covering range(n): the seeded permutation cut by `split_sizes`.

    Part k is the same for every caller with the same (n, shares, seed), which is what keeps
    the SFT, reward and PPO shares of a dataset disjoint across separate runs.
    """
    order = permutation(n, seed)
    parts = []
    start = 0
    for size in split_sizes(n, shares):
        parts.append(order[start : start + size])
        start += size
    return parts


def hold_out(indices: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits (already shuffled) indices into (train, eval), eval taken from the end.

    eval has round(eval_fraction * m) items, at least one when eval_fraction > 0 and m >= 2,
    and never all m.
    """
    m = len(indices)
    n_eval = int(np.floor(eval_fraction * m + 0.5))
    if eval_fraction > 0 and m >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(m - 1, 0))
    return indices[: m - n_eval], indices[m - n_eval :]


def reweight(n: int, weight: float, seed: int | Sequence[int]) -> np.ndarray:
    """Indices into range(n) giving round(weight * n) items: whole copies, then a seeded
    sample without replacement for the fractional part."""
    total = int(np.floor(weight * n + 0.5))
    if n == 0 or total == n:
        return np.arange(n, dtype=np.int64)
    copies, rest = divmod(total, n)
    return np.concatenate(
        [np.tile(np.arange(n, dtype=np.int64), copies), np.sort(permutation(n, seed)[:rest])]
    )
