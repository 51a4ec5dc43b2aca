"""The three steps in one run directory: SFT -> reward model -> PPO.

The SFT model (``<run>/sft/final``) initialises the PPO actor and reference; the reward
model (``<run>/reward/final``) the critic and reward model. Each step reads its own share
of the data (``data.data_split``, ``datasets[].steps``). A step whose final model and
summary entry exist is skipped on ``--resume``; an unfinished step continues from its
latest checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from shared.config import RLHFConfig
from shared.runlog import RunLogger
from torch_rlhf.distributed import barrier
from torch_rlhf.ppo import PPOTrainer
from torch_rlhf.reward import RewardTrainer
from torch_rlhf.runtime import open_run_logger
from torch_rlhf.sft import SFTTrainer

__all__ = ["run_pipeline", "run_ppo", "run_reward", "run_sft", "step_done"]

logger = logging.getLogger(__name__)


def step_done(run_dir: str | Path, step: str) -> bool:
    """Whether ``step`` finished in ``run_dir``: its final model and summary entry exist."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if not summary.is_file() or not (run_dir / step / "final" / "config.json").is_file():
        return False
    return step in json.loads(summary.read_text())


def run_sft(config: RLHFConfig, run_dir: str | Path, *, resume: bool = False,
            run_logger: RunLogger | None = None) -> dict[str, Any]:
    """Step 1; returns its summary entry."""
    return SFTTrainer(config, run_dir=run_dir, run_logger=run_logger).run(resume=resume)


def run_reward(config: RLHFConfig, run_dir: str | Path, *, resume: bool = False,
               run_logger: RunLogger | None = None) -> dict[str, Any]:
    """Step 2; returns its summary entry."""
    return RewardTrainer(config, run_dir=run_dir, run_logger=run_logger).run(resume=resume)


def run_ppo(config: RLHFConfig, run_dir: str | Path, *, actor: str | None = None,
            critic: str | None = None, resume: bool = False,
            run_logger: RunLogger | None = None) -> dict[str, Any]:
    """Step 3 from ``actor`` (SFT model) and ``critic`` (reward model); defaults from the
    config's ``model`` section. Returns its summary entry."""
    trainer = PPOTrainer(config, run_dir=run_dir, actor_model_name_or_path=actor,
                         critic_model_name_or_path=critic, run_logger=run_logger)
    return trainer.run(resume=resume)


def run_pipeline(config: RLHFConfig, run_dir: str | Path, *,
                 resume: bool = False) -> dict[str, Any]:
    """``config.pipeline_steps`` in order in ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    run_logger = open_run_logger(config, run_dir)
    steps = config.pipeline_steps
    start = time.perf_counter()
    try:
        for step in steps:
            if resume and step_done(run_dir, step):
                logger.info("pipeline: %s already finished in %s; skipping", step, run_dir)
                continue
            logger.info("pipeline: step %s", step)
            if step == "sft":
                run_sft(config, run_dir, resume=resume, run_logger=run_logger)
            elif step == "reward":
                run_reward(config, run_dir, resume=resume, run_logger=run_logger)
            else:
                actor = str(run_dir / "sft" / "final") if "sft" in steps else None
                critic = str(run_dir / "reward" / "final") if "reward" in steps else None
                run_ppo(config, run_dir, actor=actor, critic=critic, resume=resume,
                        run_logger=run_logger)
            barrier()
            gc.collect()  # the step's DeepSpeed engines
        summary = run_logger.update_summary()
        walls = {step: summary[step]["timings"]["wall_time"] for step in steps if step in summary}
        return run_logger.update_summary(timings={
            **{f"{step}_wall_time": wall for step, wall in walls.items()},
            "pipeline_wall_time": round(time.perf_counter() - start, 3)})
    finally:
        run_logger.close()
