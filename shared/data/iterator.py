"""A seeded, resumable batch iterator over any `ArrayBatch`, shared by both backends.

Epoch e visits the examples in the order `RandomState([seed, e]).permutation(N)` (or in order
when shuffle=False), so the sequence of batches is a pure function of (seed, N, batch_size,
drop_last). The state is two integers, `epoch` and `position` (batches already served in that
epoch); a restored iterator serves exactly the batches the original would have served next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Generic

import numpy as np

from shared.data.batches import B
from shared.data.splits import permutation

logger = logging.getLogger("shared.data")


class BatchIterator(Generic[B]):
    """Batches of `batch_size` examples from `data`, epoch after epoch.

    drop_last=True serves `N // batch_size` full batches per epoch and drops the remaining
    `N % batch_size` examples of that epoch's order (different ones each epoch when shuffled);
    drop_last=False serves a last, shorter batch instead. Either way the choice and its effect
    are logged at construction and exposed as `batches_per_epoch` and `dropped_per_epoch`.

    Use `for batch in it` to run to the end of the current epoch (the next loop starts the next
    epoch), or `next_batch()` to step across epochs without limit.
    """

    def __init__(
        self,
        data: B,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        name: str = "data",
    ):
        n = len(data)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; expected a positive integer")
        if n == 0:
            raise ValueError(f"{name}: cannot iterate over an empty dataset")
        if drop_last and batch_size > n:
            raise ValueError(
                f"{name}: batch_size {batch_size} exceeds the {n} examples and drop_last=True "
                "would serve no batch; lower batch_size or set drop_last=False"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        full, rest = divmod(n, batch_size)
        self.batches_per_epoch = full if drop_last or rest == 0 else full + 1
        self.dropped_per_epoch = rest if drop_last else 0
        logger.info(
            "%s: %d examples, batch size %d, %d batches per epoch, drop_last=%s drops %d "
            "examples per epoch",
            name,
            n,
            batch_size,
            self.batches_per_epoch,
            drop_last,
            self.dropped_per_epoch,
        )

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.data)
            self._order = permutation(n, [self.seed, self.epoch]) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> B:
        """The next batch, moving to the next epoch after the last batch of this one."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self.data.take(indices)

    def __iter__(self) -> Iterator[B]:
        """The remaining batches of the current epoch (all of the next one if it is over)."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable state; `num_examples`, `batch_size`, `seed` guard the restore."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_examples": len(self.data),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores `state_dict()` output; the data, batch size and seed must be the same."""
        for key, mine in (
            ("num_examples", len(self.data)),
            ("batch_size", self.batch_size),
            ("seed", self.seed),
        ):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator {mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"iterator state epoch={epoch}, position={position} out of range "
                f"(0..{self.batches_per_epoch} batches per epoch)"
            )
        self.epoch, self.position = epoch, position
