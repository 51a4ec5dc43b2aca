"""Where a step's resumable checkpoints live, and which of them count.

One layout for both backends::

    <run>/<step>/checkpoints/
        step-00000002/        one checkpoint, named after its counter (zero-padded, so names
                              sort in order); inside, whatever the backend writes
                              (DeepSpeed engine states, an orbax tree, ...)
            MANIFEST.json     the backend, the config (and its sha256), the library versions
                              and the size and sha256 of every other file (`shared.manifest`)
            COMPLETE          written last, once every process has finished writing: a
                              directory without it (a run killed while saving) is ignored

The backend writes into the directory; this module names, finds, completes, verifies and
prunes them. Only the main process deletes, hashes or marks; every process calls `prepare`
and `commit` (they synchronise through the backend's `barrier`). Nothing here imports torch
or jax.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.manifest import MANIFEST, verify_manifest, write_manifest

__all__ = ["COMPLETE", "MANIFEST", "CheckpointDir"]

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

    def commit(self, path: str | Path, *, backend: str | None = None,
               config: Any = None) -> None:
        """Marks ``path`` complete once every process has written its share, then deletes
        the checkpoints beyond ``keep`` and partial ones older than ``path``.

        With ``backend`` and ``config`` (the run's ``RLHFConfig``), ``MANIFEST.json`` is
        written first (``shared.manifest.write_manifest``), so ``verify`` can check it.
        """
        path = Path(path)
        self.barrier()
        if self.is_main:
            if backend is not None:
                write_manifest(path, backend=backend, config=config)
            (path / COMPLETE).write_text(path.name + "\n")
            self._prune()
        self.barrier()

    def verify(self, path: str | Path, *, backend: str, config: Any) -> None:
        """Refuses to resume from ``path`` when another backend or another config wrote it, or
        when a file changed since (``shared.manifest.verify_manifest``); every process checks
        (each reads the files it restores)."""
        verify_manifest(path, backend=backend, config=config)

    def _prune(self) -> None:
        done = self.complete()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if done:  # partial checkpoints older than the newest complete one
            for partial in self.root.iterdir():
                if partial.is_dir() and partial.name < done[-1].name and partial not in done:
                    shutil.rmtree(partial, ignore_errors=True)
