"""The served critic's bookkeeping, once for both backends (`rlhf serve critic`,
docs/serving.md): the step rule that makes ``train_step`` safe to retry, and the critic's own
checkpoints. A backend supplies a `CriticTrainer` (its critic, built and trained exactly as in
its in-process PPO step); `CriticHandler` turns it into the `RoleHandler` the server runs.

The step rule: the server counts the ``train_step`` requests it has applied (``step``, 0 when
it starts). A request carries the step it expects to be: the server's ``step`` is applied and
answered; one of the last `ANSWERS_KEPT` steps already applied (a client retrying after a lost
answer, or another rank of a multi-process actor sending the same global step: every rank
holds all rows, and a rank may send its next step before another's request for this one
arrives) gets the cached answer again and changes nothing; anything else is refused with a
`ConflictError`
(HTTP 409) naming both numbers, so a server that restarted and lost its state can never train
a run on from the wrong weights without saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.serving.protocol import ConflictError, ProtocolError

__all__ = ["ANSWERS_KEPT", "CRITIC_FIELDS", "CRITIC_STATS", "CriticHandler", "CriticTrainer",
           "critic_total_steps"]

ANSWERS_KEPT = 4
"""Answers of the latest applied steps the server keeps for repeats (a rank can be at most one
step ahead of another: it sends step k + 1 before its own step k's actor update, which waits
for every rank)."""

logger = logging.getLogger(__name__)

ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask")
CRITIC_FIELDS = (*ROLLOUT_FIELDS, "response_mask", "values", "returns")
"""The micro-batch fields a critic step reads (``values``: the rollout's old values); a
``train_step`` request stacks them as ``[A, M, ...]`` (A micro-batches of M rows)."""
CRITIC_STATS = ("critic_loss", "value_clip_fraction", "critic_lr", "critic_grad_norm")
"""What a critic step returns, as the in-process backends do (sums over the micro-batches;
value_clip_fraction token-weighted)."""
STATE_FILE = "critic_server.json"


class CriticTrainer(Protocol):
    """A backend's critic for `CriticHandler` (torch_rlhf.serving, jax_rlhf.serving)."""

    identity: dict[str, Any]
    total_steps: int
    """The critic's optimiser steps of the whole run (its LR schedule's length)."""

    def values(self, rollout: Mapping[str, np.ndarray]) -> np.ndarray:
        """[B, N] values of a rollout (``prompt_ids``, ``prompt_mask``, ``response``,
        ``sample_mask``), as the in-process ``score``."""

    def train(self, micro_batches: list[dict[str, np.ndarray]],
              normalizers: list[float]) -> dict[str, float]:
        """One critic optimiser step over the micro-batches: `CRITIC_STATS`."""

    def save(self, path: Path) -> None:
        """Weights, optimiser and LR scheduler state into the new directory ``path``."""

    def load(self, path: Path) -> None: ...

    def export(self, path: Path) -> None:
        """The critic as an HF directory (the in-process ``critic/`` export)."""


def critic_total_steps(config: Any, tokenizer: Any, *, world_size: int) -> int:
    """The critic's optimiser steps in a PPO run of ``config`` on ``world_size`` actor
    processes: the loop's own count (`shared.ppo_loop.ppo_counts`) over the run's data."""
    from shared.data import build_step_data
    from shared.ppo_loop import ppo_counts

    data = build_step_data(config.data, tokenizer, "ppo")
    counts, _ = ppo_counts(config, train_prompts=len(data.train), world_size=world_size)
    return counts.total_optimizer_steps


def _digest(root: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``root``."""
    sha = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


class CriticHandler:
    """The `RoleHandler` of a critic server: ``values`` (batchable), ``train_step`` (the step
    rule of the module doc), ``save``/``load`` (``<checkpoint_dir>/<tag>/``) and ``export``."""

    def __init__(self, trainer: CriticTrainer, *, checkpoint_dir: str | Path):
        self.trainer, self.identity = trainer, trainer.identity
        self.checkpoint_dir = Path(checkpoint_dir)
        self.step = 0
        self.answers: dict[int, dict[str, Any]] = {}  # the latest steps' answers, by step
        self.repeats = 0  # requests answered from ``answers``

    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        if endpoint == "values":
            missing = [f for f in ROLLOUT_FIELDS if f not in arrays]
            if missing:
                raise ProtocolError(f"missing field(s): {', '.join(missing)}")
            return {"values": np.asarray(self.trainer.values(arrays), np.float32)}
        if endpoint == "train_step":
            return self.train_step(arrays, body)
        if endpoint in ("save", "load"):
            tag = body.get("tag")
            if not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9._-]+", tag)):
                raise ProtocolError(f"tag: {tag!r} is not a checkpoint name (letters, digits, "
                                    "'.', '_', '-')")
            return self.save(tag) if endpoint == "save" else self.load(tag)
        if endpoint == "export":
            path = body.get("path")
            if not isinstance(path, str) or not path:
                raise ProtocolError("path: the directory to export the critic to is required")
            self.trainer.export(Path(path))
            return {"path": path, "step": self.step}
        raise ProtocolError(f"{endpoint}: not an endpoint of the critic server")

    # ------------------------------------------------------------ training

    def train_step(self, arrays: dict[str, np.ndarray], body: Mapping[str, Any]) -> dict:
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ProtocolError(f"step: {step!r} is not a step number (an int >= 0)")
        if step < self.step and step in self.answers:
            logger.info("critic train_step %d again (a retry or another rank): the cached "
                        "answer", step)
            self.repeats += 1
            return self.answers[step]
        if step != self.step:
            if self.step == 0:
                lost = (" (this server has applied no step: it started fresh or restarted and "
                        "lost the run's critic state; resume the run from its last checkpoint "
                        "(--resume), which loads the critic's checkpoint here)")
            elif step < self.step:
                lost = (" (this server has trained further than the run: a new run needs a "
                        "fresh critic server, a resumed one loads its checkpoint here)")
            else:
                lost = ""
            raise ConflictError(f"the critic server's next step is {self.step}, the request is "
                                f"for step {step}{lost}")
        total = body.get("total_steps")
        if total is not None and total != self.trainer.total_steps:
            raise ConflictError(
                f"total_steps: the run has {total} critic steps, this server schedules "
                f"{self.trainer.total_steps} (serve it with the run's config and "
                "--world-size of the actor's processes)")
        missing = [f for f in CRITIC_FIELDS if f not in arrays]
        if missing:
            raise ProtocolError(f"missing field(s): {', '.join(missing)}")
        count = arrays["response"].shape[0] if arrays["response"].ndim == 3 else -1
        if count < 1 or any(arrays[f].shape[0] != count for f in CRITIC_FIELDS):
            raise ProtocolError("every field must be [A, M, ...] with the same A micro-batches")
        normalizers = body.get("normalizers")
        if not (isinstance(normalizers, list) and len(normalizers) == count
                and all(isinstance(n, int | float) for n in normalizers)):
            raise ProtocolError(f"normalizers: expected {count} numbers, got {normalizers!r}")
        accumulation = getattr(getattr(self.trainer, "config", None), "ppo", None)
        accumulation = getattr(accumulation, "gradient_accumulation_steps", count)
        if count != accumulation:
            raise ProtocolError(f"{count} micro-batches in one step; this server's config has "
                                f"ppo.gradient_accumulation_steps {accumulation}")
        micro = [{f: arrays[f][a] for f in CRITIC_FIELDS} for a in range(count)]
        stats = self.trainer.train(micro, [float(n) for n in normalizers])
        answer = {**{k: float(stats[k]) for k in CRITIC_STATS}, "step": step}
        self.answers = {k: v for k, v in self.answers.items() if k > step - ANSWERS_KEPT}
        self.answers[step] = answer
        self.step += 1
        return answer

    # ------------------------------------------------------------ checkpoints

    def save(self, tag: str) -> dict[str, Any]:
        """Weights, optimiser, scheduler and step counter into ``<checkpoint_dir>/<tag>/``
        (written aside and renamed, so a tag on disk is always whole)."""
        final = self.checkpoint_dir / tag
        partial = self.checkpoint_dir / f".{tag}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.trainer.save(partial / "critic")
        digest = _digest(partial / "critic")
        record = {"tag": tag, "step": self.step, "digest": digest,
                  "answers": [self.answers[k] for k in sorted(self.answers)]}
        (partial / STATE_FILE).write_text(json.dumps(record))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        logger.info("critic checkpoint %s at step %d -> %s", tag, self.step, final)
        return {"tag": tag, "step": self.step, "digest": digest, "path": str(final)}

    def load(self, tag: str) -> dict[str, Any]:
        path = self.checkpoint_dir / tag
        if not (path / STATE_FILE).is_file():
            raise ConflictError(f"no critic checkpoint {tag!r} in {self.checkpoint_dir} (the "
                                "server's --checkpoint-dir must be the one it saved to)")
        record = json.loads((path / STATE_FILE).read_text())
        digest = _digest(path / "critic")
        if digest != record["digest"]:
            raise ConflictError(f"critic checkpoint {path}: its files changed since it was "
                                f"saved (sha256 {digest[:12]}, saved {record['digest'][:12]})")
        self.trainer.load(path / "critic")
        self.step = int(record["step"])
        self.answers = {int(a["step"]): a for a in record.get("answers", [])}
        logger.info("critic checkpoint %s loaded: step %d", tag, self.step)
        return {"tag": tag, "step": self.step, "digest": digest, "path": str(path)}
