"""The PPO loop's side of a served critic (``ppo.critic.url``; docs/serving.md): its training
steps, checkpoints and export. Its values at the rollout weights come with the other served
scores (`shared.serving.roles.ServedScoring`).

`shared.ppo_loop` sends every critic optimiser step's micro-batches (the ones the in-process
backend's step would train the critic on), while the actor's own step on them runs
(`train_step_async`: the critic node trains while the actor node does, NeMo-RLHF's point of
serving it), with the step number it expects the server to be
at (`shared.serving.critic_handler`'s step rule: a retried step is answered from the server's
cache, never applied twice); saves the server's critic with each of its own checkpoints (same
tag) and records the server's answer in its loop state; on resume loads that tag there and
checks the step counter matches.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import RunError
from shared.serving.client import RoleClient
from shared.serving.critic_handler import CRITIC_FIELDS, CRITIC_STATS
from shared.serving.protocol import tokenizer_fingerprint

__all__ = ["ServedCritic"]


class ServedCritic:
    """A client of ``config.ppo.critic.url``; ``step``: the critic steps sent so far."""

    def __init__(self, config: Any, tokenizer: Any, *, total_steps: int,
                 client: RoleClient | None = None):
        """``client``: the critic server's client the loop already has (`ServedScoring`'s,
        which asks it for values); one of its own when None."""
        served = config.ppo.critic
        self.client = client or RoleClient("critic", served.url,
                                           tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                                           timeout_s=served.timeout_s)
        self.total_steps = total_steps
        self.step = 0
        self._sender: ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        return self.client.url

    def train_step(self, micro_batches: list[dict[str, np.ndarray]],
                   normalizers: list[float]) -> dict[str, float]:
        """One critic optimiser step on the server: `CRITIC_STATS` as the in-process
        backend's ``train_step`` returns them."""
        arrays = {f: np.stack([np.asarray(m[f]) for m in micro_batches]) for f in CRITIC_FIELDS}
        reply = self.client.call("train_step", step=self.step, total_steps=self.total_steps,
                                 normalizers=[float(n) for n in normalizers], **arrays)
        if reply.get("step") != self.step:
            raise RunError(f"critic server {self.url}: answered step {reply.get('step')} to "
                           f"train_step {self.step}; not used")
        self.step += 1
        return {k: float(reply[k]) for k in CRITIC_STATS}

    def train_step_async(self, micro_batches: list[dict[str, np.ndarray]],
                         normalizers: list[float]) -> Future:
        """`train_step`, sent from a thread of its own: the future's result is its stats.
        One request at a time (a second waits for the first), so steps reach the server in
        order."""
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="served-critic")
        return self._sender.submit(self.train_step, micro_batches, normalizers)

    def save(self, tag: str) -> dict[str, Any]:
        """The server's checkpoint ``tag`` of its critic: {tag, step, digest, path}."""
        reply = self.client.call("save", tag=tag)
        if reply.get("step") != self.step:
            raise RunError(f"critic server {self.url} saved step {reply.get('step')}, this run "
                           f"has sent {self.step} critic steps: it is not this run's critic")
        return {k: reply[k] for k in ("tag", "step", "digest", "path")}

    def load(self, record: dict[str, Any] | None, *, checkpoint: Path) -> None:
        """Restore the server's critic saved with the actor's ``checkpoint`` (``record``: what
        `save` returned then)."""
        if not record:
            raise RunError(f"{checkpoint} has no served critic's checkpoint (saved without "
                           "ppo.critic.url?); resume it with the critic in process, or start "
                           "a new run")
        reply = self.client.call("load", tag=record["tag"])
        if reply.get("step") != record["step"] or reply.get("digest") != record["digest"]:
            raise RunError(
                f"critic server {self.url}: its checkpoint {record['tag']} is at step "
                f"{reply.get('step')} (sha256 {str(reply.get('digest'))[:12]}), the actor's "
                f"{checkpoint} recorded step {record['step']} (sha256 "
                f"{record['digest'][:12]}): not the critic of this checkpoint")
        self.step = int(record["step"])

    def export(self, path: Path) -> str:
        """The critic as an HF directory at ``path``, written by the server (a path both
        machines see: one machine, or a shared filesystem)."""
        self.client.call("export", path=str(Path(path).resolve()))
        return str(path)
