"""sft -> reward -> ppo in one run directory, each step feeding the next.

The SFT output (`<run>/sft/final/`) initialises the PPO actor and reference (and the reward
model when neither `model.critic_model_name_or_path` nor `model.critic_config` is set); the
reward-model output (`<run>/reward/final/`) initialises the PPO critic and reward model. Each
finished step records its entry in `summary.json`; with `resume`, finished steps are skipped
and an unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jax_rlhf.train.common import RunContext

logger = logging.getLogger(__name__)


def _final(ctx: RunContext, step: str) -> Path | None:
    path = ctx.step_dir(step) / "final"
    return path if (path / "config.json").exists() else None


def run_step(ctx: RunContext, step: str, *, resume: bool = False, actor: str | None = None,
             critic: str | None = None) -> dict:
    """Runs one step ("sft", "reward" or "ppo"), records it in summary.json, returns its entry.

    Defaults for the initial models: this run's earlier outputs, else the config's paths.
    """
    from jax_rlhf.train.ppo import PPOTrainer
    from jax_rlhf.train.reward import RewardTrainer
    from jax_rlhf.train.sft import SFTTrainer

    start = time.perf_counter()
    sft_out, reward_out = _final(ctx, "sft"), _final(ctx, "reward")
    if step == "sft":
        entry = SFTTrainer(ctx).run(resume=resume)
    elif step == "reward":
        entry = RewardTrainer(ctx, init_path=sft_out).run(resume=resume)
    elif step == "ppo":
        trainer = PPOTrainer(ctx, actor_path=actor or sft_out, critic_path=critic or reward_out)
        entry = trainer.run(resume=resume)
    else:
        raise ValueError(f"unknown step {step!r}")
    entry["timings"]["wall"] = time.perf_counter() - start
    summary = ctx.logger.update_summary(backend="jax", **{step: entry})
    timings = dict(summary.get("timings", {}))
    timings[step] = entry["timings"]["wall"]
    timings["total"] = sum(v for k, v in timings.items() if k in ("sft", "reward", "ppo"))
    ctx.logger.update_summary(timings=timings)
    return entry


def run_pipeline(ctx: RunContext, *, resume: bool = False) -> dict:
    """Every step of `pipeline_steps` in order; returns the final summary."""
    summary = ctx.logger.update_summary(backend="jax")
    for step in ctx.config.pipeline_steps:
        if resume and step in summary and _final(ctx, step) is not None:
            logger.info("pipeline: %s already finished, skipping", step)
            continue
        run_step(ctx, step, resume=resume)
        summary = ctx.logger.update_summary()
    return summary
