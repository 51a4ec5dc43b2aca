"""The torch PPO critic, once for the in-process step and the critic server: its DeepSpeed
engine (`build_critic_engine`), its values (`critic_values`), its half of a PPO micro-step
(`critic_micro_step`: the value loss of `shared.critic_loss`, backward, DeepSpeed step) and
`TorchCritic`, the `shared.serving.critic_handler.CriticTrainer` of `rlhf serve critic`.

`torch_rlhf.engine.RLHFEngine` builds the in-process critic with `build_critic_engine` and
`torch_rlhf.ppo.PPOTrainer` trains it with `critic_micro_step`, so a served critic is built
and trained by the same code (docs/serving.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.ppo_step import critic_loss
from shared.serving.critic_handler import critic_total_steps
from shared.serving.protocol import tokenizer_fingerprint
from torch_rlhf.optim import (
    backward,
    build_train_engine,
    current_lr,
    optimizer_step,
    train_ds_config,
)
from torch_rlhf.runtime import build_model, lora_settings, resolve_tokenizer

__all__ = ["TorchCritic", "build_critic_engine", "critic_micro_step", "critic_values"]


def build_critic_engine(config: RLHFConfig, tokenizer, *, name_or_path: str | None,
                        config_dict: Mapping[str, Any] | None, total_steps: int):
    """The critic's DeepSpeed training engine: ``ppo.critic`` (LoRA, dropout, gradient
    checkpointing), ``ppo.critic_optim`` with the schedule over ``total_steps``."""
    ppo, tp = config.ppo, config.engine.torch
    ds_config = train_ds_config(optim=ppo.critic_optim, stage=tp.critic_zero_stage,
                                offload=tp.offload, dtype=config.model.dtype,
                                micro_batch_size=ppo.per_device_training_batch_size,
                                gradient_accumulation_steps=ppo.gradient_accumulation_steps)
    model = build_model("value", config, tokenizer, name_or_path=name_or_path,
                        config_dict=config_dict, module=ppo.critic, ds_config=ds_config)
    return build_train_engine(model, ds_config=ds_config, optim=ppo.critic_optim,
                              lora=ppo.critic.lora, total_steps=total_steps)


def critic_values(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_length: int) -> torch.Tensor:
    """values[:, t] = V(x, y_<t): the critic at the position predicting answer token t."""
    return model(sequences, attention_mask).float()[:, prompt_length - 1:-1]


def critic_micro_step(critic, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_length: int, batch: Mapping[str, torch.Tensor], *,
                      normalizer: float, conventions: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                     float | None]:
    """Forward, value loss, backward and DeepSpeed step of one micro-batch (``batch``:
    ``values`` (the rollout's), ``returns``, ``response_mask``): the loss, the
    value_clip_fraction and the step's gradient norm at an accumulation boundary (else
    None)."""
    values = critic_values(critic, sequences, attention_mask, prompt_length)
    loss, stats = critic_loss(values, batch["values"], batch["returns"], batch["response_mask"],
                              conventions=conventions, normalizer=normalizer)
    backward(critic, loss)
    return loss, stats["value_clip_fraction"], optimizer_step(critic)


class TorchCritic:
    """The critic `rlhf serve critic --backend torch` holds: loaded from ``model_dir`` as
    `torch_rlhf.ppo.PPOTrainer` loads its critic, trained by `critic_micro_step` with the
    run's LR schedule (``world_size``: the actor's processes, which fix its length)."""

    def __init__(self, config: RLHFConfig, model_dir: str | None, *, world_size: int = 1):
        from torch_rlhf.deepspeed_config import init_distributed

        init_distributed()  # a world of one (the server is one process)
        self.config = config
        self.tokenizer = resolve_tokenizer(config, model_dir)
        self.total_steps = critic_total_steps(config, self.tokenizer, world_size=world_size)
        self.engine = build_critic_engine(
            config, self.tokenizer, name_or_path=model_dir,
            config_dict=None if model_dir else config.model.critic_config,
            total_steps=self.total_steps)
        self.device = self.engine.device
        self.identity = {"role": "critic", "backend": "torch", "model": str(model_dir),
                         "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}

    def _sequences(self, batch: Mapping[str, np.ndarray]):
        ids = np.concatenate([batch["prompt_ids"], batch["response"]], 1).astype(np.int64)
        mask = np.concatenate([batch["prompt_mask"], batch["sample_mask"]], 1).astype(np.int64)
        return (torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device),
                batch["prompt_ids"].shape[1])

    @torch.no_grad()
    def values(self, rollout: Mapping[str, np.ndarray]) -> np.ndarray:
        self.engine.eval()
        try:
            return critic_values(self.engine, *self._sequences(rollout)).cpu().numpy()
        finally:
            self.engine.train()

    def train(self, micro_batches: list[dict[str, np.ndarray]],
              normalizers: list[float]) -> dict[str, float]:
        lr = current_lr(self.engine)
        sums: Counter = Counter()
        norm = None
        self.engine.train()
        for batch, normalizer in zip(micro_batches, normalizers, strict=True):
            t = {k: torch.from_numpy(np.ascontiguousarray(batch[k], np.float32)).to(self.device)
                 for k in ("values", "returns", "response_mask")}
            loss, clip, step_norm = critic_micro_step(
                self.engine, *self._sequences(batch), t, normalizer=normalizer,
                conventions=self.config.ppo.conventions)
            norm = step_norm if step_norm is not None else norm
            tokens = float(t["response_mask"].sum())
            sums["critic_loss"] += float(loss.detach())
            sums["value_clip_fraction"] += float(clip.detach()) * tokens
        return {"critic_loss": sums["critic_loss"],
                "value_clip_fraction": sums["value_clip_fraction"], "critic_lr": lr,
                "critic_grad_norm": float(norm) if norm is not None else 0.0}

    def save(self, path: Path) -> None:
        from torch_rlhf.checkpoint import CheckpointManager

        CheckpointManager(path.parent, keep=1).write(
            path, {"critic": self.engine}, {}, lora={"critic": lora_settings(
                self.config.ppo.critic)})

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="critic",
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no critic checkpoint in {path}")

    def export(self, path: Path) -> None:
        from torch_rlhf.saving import save_hf

        save_hf(self.engine, self.tokenizer, str(path))
