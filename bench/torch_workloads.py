"""Training workloads on the torch backend: the SFT step and the PPO iteration.

Both run the framework's own trainers (``torch_rlhf.sft.SFTTrainer.train_step``,
``torch_rlhf.ppo.PPOTrainer.generate_experience`` / ``train_on_experience``) on DeepSpeed
engines (ZeRO-0, fp32), on the benchmark's synthetic batches. After the trainer's figures (and
its peak memory) are taken, the same modules run a *plain* step: the Hugging Face module's
forward, the minimal loss, ``backward`` and ``torch.optim.AdamW(fused=True)`` (the optimiser
the trainers use) — no DeepSpeed, no shared losses, no bookkeeping. The difference is the
framework's overhead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.timing import (
    alternating_ppo_iterations,
    memory_snapshot,
    time_calls,
    timed_ppo_iterations,
)
from bench.workspace import Shapes, prompt_batch, sft_batch

__all__ = ["ppo_iteration", "sft_step"]


def _quiet() -> None:
    import logging

    for name in ("DeepSpeed", "deepspeed", "torch_rlhf", "shared"):
        logging.getLogger(name).setLevel(logging.WARNING)


def sft_step(config: Any, run_dir: Path, lm_dir: str, shapes: Shapes, *, vocab_size: int,
             warmup: int = 1, repeats: int = 3, budget_s: float | None = None) -> dict[str, Any]:
    """``SFTTrainer.train_step`` on [sft_batch, P + N], then the plain reference step."""
    calls = {"warmup": warmup, "repeats": repeats, "budget_s": budget_s}
    from torch_rlhf.deepspeed_config import init_distributed
    from torch_rlhf.sft import SFTTrainer

    init_distributed()
    _quiet()
    trainer = SFTTrainer(config, run_dir=run_dir, model_name_or_path=lm_dir)
    loaded = memory_snapshot()
    batch = sft_batch(shapes.sft_batch, shapes, vocab_size)
    timing = time_calls(lambda: trainer.train_step(batch), label="train_step", **calls)
    out = {"framework": timing, **memory_snapshot(), "rss_after_load_bytes": loaded["rss_bytes"]}

    module = trainer.engine.module
    ids = torch.from_numpy(batch.input_ids).long()
    mask = torch.from_numpy(batch.attention_mask).long()
    loss_mask = torch.from_numpy(batch.loss_mask[:, 1:]).float()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)

    def plain_step():
        logits = module(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none")
        loss = (nll * loss_mask.reshape(-1)).sum() / loss_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    module.train()
    out["plain"] = time_calls(plain_step, label="plain_step", **calls)
    return out


def ppo_iteration(config: Any, run_dir: Path, lm_dir: str, value_dir: str, shapes: Shapes, *,
                  vocab_size: int, warmup: int = 1, repeats: int = 2,
                  budget_s: float | None = None, plain: bool = True,
                  rollout_logprobs: bool = False) -> dict[str, Any]:
    """PPO iterations through ``PPOTrainer`` (generation, scoring, training phases from its
    ``PhaseTimer``), then the plain scoring pass and plain actor + critic step."""
    from torch_rlhf.deepspeed_config import init_distributed
    from torch_rlhf.ppo import PPOTrainer

    init_distributed()
    _quiet()
    trainer = PPOTrainer(config, run_dir=run_dir, actor_model_name_or_path=lm_dir,
                         critic_model_name_or_path=value_dir)
    trainer.eos_token_id = None  # full-length answers: nothing ends a row
    loaded = memory_snapshot()
    prompts = prompt_batch(shapes.ppo_rollout_batch, shapes, vocab_size)

    # rollout_logprobs: the conventions.old_logprobs rollout row too, alternating with this one
    loop = alternating_ppo_iterations if rollout_logprobs else timed_ppo_iterations
    out, experience = loop(trainer, prompts, warmup=warmup, repeats=repeats,
                           budget_s=budget_s, rss_after_load=loaded["rss_bytes"], sync=_sync)
    if plain:
        out["plain"] = _plain_ppo(trainer, experience, shapes, warmup=warmup, repeats=repeats,
                                  budget_s=budget_s)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _module(model):
    return getattr(model, "module", model)


def _plain_ppo(trainer, experience, shapes: Shapes, *, warmup: int, repeats: int,
               budget_s: float | None):
    calls = {"warmup": warmup, "repeats": repeats, "budget_s": budget_s}
    engine = trainer.engine
    actor, ref = _module(engine.actor), _module(engine.ref)
    critic, reward = _module(engine.critic), _module(engine.reward)
    experience = trainer.with_advantages([experience])
    device = trainer.device

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    seq = tensor(np.concatenate([experience.prompt_ids, experience.response], 1))
    mask = tensor(np.concatenate([experience.prompt_mask,
                                  experience.sample_mask.astype(np.int64)], 1))
    prompt_len = shapes.prompt_len
    response = tensor(experience.response)

    def response_logprobs(model, rows):
        logits = model(input_ids=seq[rows], attention_mask=mask[rows]).logits
        logits = logits[:, prompt_len - 1:-1]
        tokens = response[rows]
        return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                reduction="none").view(tokens.shape)

    everything = slice(None)

    def score():
        with torch.no_grad():
            response_logprobs(actor, everything)
            response_logprobs(ref, everything)
            critic(seq, mask)
            reward(seq, mask)

    for model in (actor, ref, critic, reward):
        model.eval()
    scoring = time_calls(score, label="plain_scoring", **calls)

    rows = slice(0, shapes.ppo_minibatch)
    advantages, returns = tensor(experience.advantages[rows]), tensor(experience.returns[rows])
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=1e-6, fused=True)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-6, fused=True)

    def step():
        logprobs = response_logprobs(actor, rows)
        actor_loss = -(logprobs * advantages).mean()
        values = critic(seq[rows], mask[rows])[:, prompt_len - 1:-1]
        critic_loss = F.mse_loss(values, returns)
        (actor_loss + critic_loss).backward()
        for optimizer in (actor_opt, critic_opt):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    actor.train()
    critic.train()
    training = time_calls(step, label="plain_step", **calls)
    return {"scoring": scoring, "step": training}

