"""`rlhf launch --config F`: NeMo-RLHF's four jobs on one machine. Runs the config's pipeline
(or `rlhf ppo` with ``--step ppo``); just before the PPO step it starts an `rlhf serve` process
for every served role the config names on this machine (``ppo.reward_model.url``,
``ppo.initial_policy.url``, ``ppo.critic.url`` with host 127.0.0.1 or localhost), waits until
each answers, and stops them (only them) when the run ends, fails or is interrupted
(docs/serving.md). A critic server keeps its checkpoints in ``<run>/ppo/critic-server/``.

Each server loads ``ppo.<role>.model`` when set, else what the PPO step would load in process:
this run's SFT model (initial policy) and reward model (reward, critic) when the pipeline
trained them, else the config's ``model.actor_model_name_or_path`` / the reward model source.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from shared.errors import InputError, RunError
from shared.pipeline import final_model
from shared.reward_fn import is_served
from shared.serving.client import RoleClient, ServedRoleError

__all__ = ["Launcher", "served_roles"]

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def served_roles(config: Any) -> list[tuple[str, Any]]:
    """``[(role, ServedRoleConfig), ...]`` of the model roles ``config`` serves (the critic's
    settings are a `CriticConfig`, with the same url, timeout_s and model)."""
    from shared.critic_free import models_used

    ppo = config.ppo
    roles = [("initial-policy", ppo.initial_policy)]
    if ppo.reward_model_weight != 0:
        roles.append(("reward", ppo.reward_model))
    if any(m.startswith("critic@") for m in models_used(config)):
        roles.append(("critic", ppo.critic))
    return [(role, served) for role, served in roles if served.url is not None]


class Launcher:
    """Starts the servers before the PPO step (`before_step`) and `stop`s them."""

    def __init__(self, config: Any, args: argparse.Namespace):
        self.config, self.args = config, args
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.roles = served_roles(config)
        for role, served in self.roles:
            host = urllib.parse.urlsplit(served.url).hostname
            if host not in LOCAL_HOSTS:
                raise InputError(
                    f"rlhf launch: the {role} server {served.url} is not on this machine; "
                    "launch starts servers on 127.0.0.1/localhost only (start that one with "
                    f"`rlhf serve {role}` there, or use the SLURM script of docs/serving.md)")
        if is_served(config.ppo.reward_function):
            logger.info("rlhf launch: ppo.reward_function %s is a server launch does not "
                        "start (rlhf serve function --function module:function)",
                        config.ppo.reward_function)

    def _model(self, role: str, served: Any, run_dir: Path) -> str:
        if served.model:
            return served.model
        model = self.config.model
        if role == "initial-policy":
            path = (getattr(self.args, "actor", None) or final_model(run_dir, "sft")
                    or model.actor_model_name_or_path)
        else:
            path = (getattr(self.args, "critic", None) or final_model(run_dir, "reward")
                    or model.reward_model_source()[0])
        if path is None:
            raise InputError(f"rlhf launch: no model to serve as {role}: set "
                             f"ppo.{role.replace('-', '_')}.model")
        return str(path)

    def before_step(self, step: str, run_dir: Path) -> None:
        if step != "ppo" or self.processes or not self.roles:
            return
        from shared.errors import process_count, process_rank

        if process_rank() != 0:
            return  # rank 0 starts them; every rank waits for them in the PPO loop
        logs = run_dir / "servers"
        logs.mkdir(parents=True, exist_ok=True)
        for role, served in self.roles:
            port = urllib.parse.urlsplit(served.url).port
            model = self._model(role, served, run_dir)
            argv = [sys.executable, "-m", "shared.cli", "serve", role, "--model", model,
                    "--port", str(port), "--backend", self.args.backend]
            if role == "critic":  # its checkpoints beside the actor's; the actor's processes
                # fix its number of steps (its LR schedule)
                argv += ["--checkpoint-dir", str(run_dir / "ppo" / "critic-server"),
                         "--world-size", str(process_count())]
            if self.args.config is not None:
                argv += ["--config", str(self.args.config)]
            argv += list(self.args.overrides or [])
            log = logs / f"{role}.log"
            # each server is a world of its own: not the trainer's launcher variables (a
            # torch critic server would bind this process's MASTER_PORT)
            env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
            with log.open("w") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env)
            self.processes.append((role, process, log))
            logger.info("launch: %s server (%s) on %s, log %s", role, model, served.url, log)
        for (role, process, log), (_, served) in zip(self.processes, self.roles, strict=True):
            self._wait(role, process, log, served)

    def _wait(self, role: str, process: subprocess.Popen, log: Path, served: Any) -> None:
        # short polls, so a server that exits while starting is reported at once rather than
        # after the whole ppo.<role>.timeout_s
        client = RoleClient(role, served.url, timeout_s=1.0, backoff_s=0.2, max_backoff_s=0.5)
        deadline = time.monotonic() + served.timeout_s
        while True:
            try:
                client.wait_until_ready()
                return
            except ServedRoleError as err:
                if process.poll() is None and time.monotonic() < deadline:
                    continue
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                state = ("exited with status " + str(process.returncode)
                         if process.poll() is not None else "still starting")
                raise RunError(f"rlhf launch: the {role} server did not become ready "
                               f"({state}): {err}; its log {log} ends: "
                               f"{' | '.join(tail)}") from None

    def stop(self) -> None:
        """SIGINT to each server this launcher started (a clean aiohttp shutdown), then
        SIGKILL after 30 s; nothing else is touched."""
        for _role, process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for role, process, _ in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                logger.warning("launch: the %s server did not stop in 30 s; killing it", role)
                process.kill()
                process.wait()
        self.processes = []
