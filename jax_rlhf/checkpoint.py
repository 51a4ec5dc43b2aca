"""Resumable checkpoints with orbax-checkpoint.

`DirectoryCheckpointer` writes one checkpoint into a directory the caller names (the layout
of `shared.checkpoints`: `<run>/<step>/checkpoints/step-00000002/` for SFT and the reward
model, `<run>/ppo/checkpoints/iter-00000002/` for PPO, marked `COMPLETE` by the loop once
written). A checkpoint holds two items:

- `state`: a pytree of arrays (train states: parameters, optimiser state and step counter;
  the EMA weights), saved with `StandardSave` (sharded arrays are written by every process
  for its own shards, OCDBT);
- `meta`: JSON with everything else an uninterrupted run still holds in memory: the data
  iterators' `state_dict()`, the KL controller state, iteration counters, the models'
  configs (so `rlhf export` can rebuild them), and the JAX RNG key data.

Saves are asynchronous when `engine.jax.async_checkpointing` is on (orbax copies the arrays to
host memory before `save` returns, then writes in a background thread); `keep_checkpoints`
bounds how many are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from shared.checkpoints import COMPLETE, CheckpointDir

logger = logging.getLogger(__name__)


class DirectoryCheckpointer:
    """Writes and reads `(state, meta)` checkpoints in directories named by the caller.

    With `async_save`, `save` returns once the arrays are copied to host memory and the files
    are written in a background thread (`wait` blocks until they are on disk); orbax writes
    into a temporary directory and renames it to `path` when done, on every process.
    """

    def __init__(self, *, async_save: bool = True):
        handler = ocp.CompositeCheckpointHandler()
        self.async_save = async_save
        self._checkpointer = (ocp.AsyncCheckpointer(handler) if async_save
                              else ocp.Checkpointer(handler))

    def save(self, path: str | Path, state: Any, meta: dict[str, Any]) -> None:
        """Starts writing checkpoint `path` (a directory that must not exist yet)."""
        path = Path(path).absolute()
        self._checkpointer.save(
            path, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)))
        logger.info("checkpoint -> %s", path)

    def restore(self, path: str | Path, abstract_state: Any) -> tuple[Any, dict]:
        """`(state, meta)` of checkpoint `path`, restored into the shapes, dtypes and
        shardings of `abstract_state` (`jax.ShapeDtypeStruct` leaves)."""
        path = Path(path).absolute()
        restored = self._checkpointer.restore(
            path, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        logger.info("restored checkpoint %s", path)
        return restored.state, restored.meta

    def wait(self) -> None:
        """Blocks until background writes have finished."""
        if self.async_save:
            self._checkpointer.wait_until_finished()

    def close(self) -> None:
        self._checkpointer.close()


def read_checkpoint(directory: str | Path, step: int | None = None) -> tuple[Any, dict, int]:
    """`(state as nested dicts of arrays, meta, step)` without a target structure (for export);
    `directory` is a step's `checkpoints/` folder (its latest complete checkpoint, or `step`)
    or one checkpoint inside it."""
    directory = Path(directory).absolute()
    if not (directory / COMPLETE).is_file():
        done = CheckpointDir(directory, keep=1).complete()
        if step is not None:
            done = [p for p in done if _counter(p) == step]
        directory = done[-1] if done else directory
    if not (directory / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        directory, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                           meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta, _counter(directory)


def key_data(key: jax.Array) -> list[int]:
    """A JAX PRNG key as JSON-serialisable integers (`jax.random.key_data`)."""
    return [int(x) for x in jax.random.key_data(key).ravel()]


def key_from_data(data: list[int]) -> jax.Array:
    import numpy as np

    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def _counter(path: Path) -> int:
    """The counter in a checkpoint directory's name (`step-00000002` -> 2)."""
    return int(path.name.rsplit("-", 1)[-1])
