"""``python tests/faults/stop_at.py SPEC -- rlhf-arguments``: the ``rlhf`` command, frozen at a
chosen point so that a test can kill it there with SIGKILL.

SPEC is JSON: ``{"point": ..., "step": ..., "occurrence": n, "signal_file": ...}``. When the
run reaches the ``occurrence``-th time ``point`` happens in ``step`` (``sft``, ``reward``,
``ppo``; null: any step), this process writes ``signal_file`` (what it reached) and stops
itself with SIGSTOP; the test then looks at the run directory and sends SIGKILL. Nothing
here changes what the run computes or writes: each hook runs the original first (or after,
for points named ``*-begin``) and only counts.

Points, in the order a step meets them:

==================  ==========================================================================
point               the process is frozen ...
==================  ==========================================================================
logged              just after a metrics.jsonl record of the step (before its checkpoint)
save-begin          in a checkpoint save: the directory named, nothing written into it yet
save-file           in a checkpoint save, torch only: just after one more file (a DeepSpeed
                    engine state, RNG, trainer state) was written, the others not yet
save-written        the backend's save call returned: torch has written every file; JAX
                    (asynchronous orbax) has copied the arrays and is writing in the
                    background; neither MANIFEST.json nor COMPLETE exist
save-manifest       MANIFEST.json written, COMPLETE not yet
save-complete       COMPLETE written, older checkpoints not pruned yet
export-model        in the final save: one more Hugging Face directory written (PPO: final,
                    then critic), not verified yet
export-written      in the final save: the directory written, before it is read back
summary             the final model verified, before the step's summary.json entry
==================  ==========================================================================

With SPEC ``{"rss_file": path}`` the process records its peak resident memory (KiB) there
when it exits, and stops nowhere.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import resource
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

_counts: collections.Counter = collections.Counter()
_spec: dict = {}


def _step_of(path) -> str | None:
    """``sft`` / ``reward`` / ``ppo`` from a path under ``<run>/<step>/...``."""
    parts = Path(os.fspath(path)).parts
    if "checkpoints" in parts:
        index = parts.index("checkpoints")
        return parts[index - 1] if index else None
    for name in reversed(parts):
        if name in ("sft", "reward", "ppo"):
            return name
    return None


def _hit(point: str, step: str | None) -> None:
    _counts[(point, step)] += 1
    if point != _spec.get("point") or step is None:
        return
    if _spec.get("step") not in (None, step):
        return
    if _counts[(point, step)] != _spec["occurrence"]:
        return
    Path(_spec["signal_file"]).write_text(json.dumps(
        {"point": point, "step": step, "occurrence": _counts[(point, step)],
         "pid": os.getpid()}))
    os.kill(os.getpid(), signal.SIGSTOP)


def _after(owner, name: str, point: str, step_of) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        _hit(point, step_of(*args, **kwargs))
        return out

    setattr(owner, name, wrapper)


def _before(owner, name: str, point: str, step_of) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _hit(point, step_of(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _install(backend: str) -> None:
    from shared import checkpoints, ppo_loop, supervised_loop
    from shared.runlog import RunLogger

    _after(RunLogger, "log", "logged", lambda self, step, *a, **k: step)
    _after(checkpoints.CheckpointDir, "prepare", "save-begin",
           lambda self, tag: _step_of(self.root / tag))
    _after(checkpoints, "write_manifest", "save-manifest", lambda path, **k: _step_of(path))
    _before(checkpoints.CheckpointDir, "_prune", "save-complete",
            lambda self: _step_of(self.root / "x"))
    for module in (supervised_loop, ppo_loop):
        _before(module, "verify_export", "export-written", lambda path, *a, **k: _step_of(path))

    def summary_step(self, **entries):
        steps = [s for s in ("sft", "reward", "ppo") if s in entries]
        return steps[0] if steps else None

    _before(RunLogger, "update_summary", "summary", summary_step)
    if backend == "torch":
        import torch

        from torch_rlhf import checkpoint, ppo, supervised

        _after(checkpoint.CheckpointManager, "write", "save-written",
               lambda self, path, *a, **k: _step_of(path))

        def save_step(obj, f, *a, **k):
            return _step_of(f) if isinstance(f, (str, os.PathLike)) else None

        _after(torch, "save", "save-file", save_step)
        for module in (supervised, ppo):
            _after(module, "save_hf", "export-model", lambda model, tok, out, *a: _step_of(out))
    else:
        from jax_rlhf import checkpoint
        from jax_rlhf.train import ppo, supervised

        _after(checkpoint.DirectoryCheckpointer, "save", "save-written",
               lambda self, path, *a, **k: _step_of(path))
        for module in (supervised, ppo):
            _after(module, "export_hf", "export-model",
                   lambda mdef, params, frozen, out, *a, **k: _step_of(out))


def _record_rss(path: str) -> None:
    Path(path).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def main() -> int:
    spec, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: stop_at.py SPEC -- rlhf-arguments"
    _spec.update(json.loads(spec))
    if "rss_file" in _spec:
        atexit.register(_record_rss, _spec["rss_file"])
    if "point" in _spec:
        backend = argv[argv.index("--backend") + 1]
        _install(backend)
    from shared.cli import main as rlhf

    return rlhf(argv)


if __name__ == "__main__":
    sys.exit(main())
