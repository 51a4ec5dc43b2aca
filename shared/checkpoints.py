"""Where a step's resumable checkpoints live, and which of them count.

One layout for both backends::

    <run>/<step>/checkpoints/
        step-00000002/        one checkpoint, named after its counter (zero-padded, so names
                              sort in order); inside, whatever the backend writes
                              (DeepSpeed engine states, an orbax tree, ...)
            COMPLETE          written last, once every process has finished writing: a
                              directory without it (a run killed while saving) is ignored

The backend writes into the directory; this module names, finds, completes and prunes
them. Only the main process deletes or marks; every process calls `prepare` and `commit`
(they synchronise through the backend's `barrier`). Nothing here imports torch or jax.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["COMPLETE", "CheckpointDir"]

COMPLETE = "COMPLETE"
"""The marker file of a finished checkpoint."""


def _no_barrier() -> None:
    return None


class CheckpointDir:
    """The checkpoints of one step of a run.

    Args:
      root: ``<run>/<step>/checkpoints``.
      keep: how many complete checkpoints to keep (``logging.keep_checkpoints``).
      prefix: the name of the counter (``step`` for SFT / reward, ``iter`` for PPO).
      is_main: whether this process deletes and marks (rank 0 / process 0).
      barrier: waits for every process (a no-op for one process).
    """

    def __init__(self, root: str | Path, *, keep: int, prefix: str = "step",
                 is_main: bool = True, barrier: Callable[[], None] = _no_barrier):
        if keep < 1:
            raise ValueError(f"keep: {keep} is invalid; keep at least one checkpoint")
        self.root = Path(root)
        self.keep = keep
        self.prefix = prefix
        self.is_main = is_main
        self.barrier = barrier

    def tag(self, counter: int) -> str:
        """The directory name of checkpoint ``counter`` (``step-00000002``)."""
        return f"{self.prefix}-{counter:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint (None when there is none)."""
        done = self.complete()
        return done[-1] if done else None

    def prepare(self, tag: str) -> Path:
        """The directory to write checkpoint ``tag`` into, with any earlier attempt at it (a
        partial or an older complete one) removed; the backend creates it."""
        path = self.root / tag
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                shutil.rmtree(path)
        self.barrier()
        return path

    def commit(self, path: str | Path) -> None:
        """Marks ``path`` complete once every process has written its share, then deletes
        the checkpoints beyond ``keep`` and partial ones older than ``path``."""
        path = Path(path)
        self.barrier()
        if self.is_main:
            (path / COMPLETE).write_text(path.name + "\n")
            self._prune()
        self.barrier()

    def _prune(self) -> None:
        done = self.complete()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if done:  # partial checkpoints older than the newest complete one
            for partial in self.root.iterdir():
                if partial.is_dir() and partial.name < done[-1].name and partial not in done:
                    shutil.rmtree(partial, ignore_errors=True)
