"""Optimisers, LR schedules and the DeepSpeed training step with split-invariant losses.

- :func:`param_groups`: DeepSpeed-Chat's ``get_optimizer_grouped_parameters`` (no weight
  decay on biases and norm weights; LoRA adapters at their own learning rate).
- :func:`lr_scheduler`: ``shared.make_schedule`` as a torch ``LambdaLR`` multiplier, so
  both backends use the same learning rate at every step.
- :func:`train_ds_config`, :func:`build_train_engine`: model -> AdamW -> LambdaLR ->
  DeepSpeed engine.
- :func:`backward` / :func:`optimizer_step`: the loss a trainer passes is already
  divided by the GLOBAL count (tokens or sequences over every micro-batch of the
  optimiser step on every rank). DeepSpeed would divide it by
  ``gradient_accumulation_steps`` and average gradients over ranks; we turn the first
  off (``scale_wrt_gas=False``) and multiply by the world size to undo the second, so
  the step's gradient is exactly sum(per-token losses) / global count, whatever the split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shared.config import LoRAConfig, OptimizerConfig
from shared.schedules import make_schedule
from torch_rlhf.deepspeed_config import initialize_engine, make_ds_config
from torch_rlhf.distributed import world_size

__all__ = [
    "NO_DECAY_NAMES",
    "backward",
    "build_train_engine",
    "current_lr",
    "lr_scheduler",
    "optimizer_step",
    "param_groups",
    "train_ds_config",
]

# DS-Chat's no_decay_name_list: biases and every norm's weight.
NO_DECAY_NAMES = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight",
                  "ln_1.weight", "ln_2.weight")


def param_groups(model: nn.Module, *, weight_decay: float,
                 lora_learning_rate: float | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: decayed, LoRA (own lr), not decayed.

    Empty groups are left out; a group without "lr" takes the optimiser's.
    """
    decay, lora, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name.lower() for key in NO_DECAY_NAMES):
            no_decay.append(param)
        elif ".lora_" in name:
            lora.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    lora_group: dict[str, Any] = {"params": lora, "weight_decay": weight_decay}
    if lora_learning_rate is not None:
        lora_group["lr"] = lora_learning_rate
    groups += [lora_group, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    return groups


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimizerConfig, *,
                 total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose multiplier at optimiser step s is ``shared.make_schedule``'s lr(s) / lr.

    Every param group keeps its own peak lr (the LoRA group's may differ).
    """
    multiplier = make_schedule(optim.lr_scheduler_type, base_lr=1.0,
                               warmup_steps=optim.num_warmup_steps, total_steps=total_steps,
                               min_lr_ratio=optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(multiplier(step)))


def train_ds_config(*, optim: OptimizerConfig, stage: int, offload: bool, dtype: str,
                    micro_batch_size: int, gradient_accumulation_steps: int,
                    hybrid_engine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a trained engine on this world (see ``make_ds_config``).

    ``hybrid_engine``: keyword arguments of ``make_ds_config`` for the Hybrid Engine
    (``enable_hybrid_engine``, ``inference_tp_size``, ...); None: off.
    """
    return make_ds_config(stage=stage, offload=offload, dtype=dtype,
                          train_micro_batch_size_per_gpu=micro_batch_size,
                          gradient_accumulation_steps=gradient_accumulation_steps,
                          world_size=world_size(), max_grad_norm=optim.max_grad_norm,
                          **dict(hybrid_engine or {}))


def build_train_engine(model: nn.Module, *, ds_config: Mapping[str, Any],
                       optim: OptimizerConfig, lora: LoRAConfig, total_steps: int):
    """A DeepSpeed training engine around ``model`` with AdamW and the shared schedule.

    The AdamW is torch's fused kernel (``fused=True``, CPU and CUDA): the same update as the
    default per-parameter loop, one pass per tensor instead of a dozen (a 100M-parameter
    step on CPU: 31 ms instead of 260 ms, docs/performance.md). DeepSpeed's ZeRO optimisers
    call it on their flat fp32 partitions unchanged.

    Args:
      model: a causal LM or ValueModel, LoRA already applied (built under ``ds_config``
        for ZeRO-3, so its weights are already partitioned).
      ds_config: from :func:`train_ds_config`.
      optim: learning rate, betas, eps, weight decay and schedule.
      lora: only ``lora.learning_rate`` is read here (the adapters' lr).
      total_steps: optimiser steps of the whole run (the schedule's N).
    """
    optimizer = torch.optim.AdamW(
        param_groups(model, weight_decay=optim.weight_decay,
                     lora_learning_rate=lora.learning_rate),
        lr=optim.learning_rate, betas=tuple(optim.betas), eps=optim.eps,
        weight_decay=optim.weight_decay, fused=True)
    scheduler = lr_scheduler(optimizer, optim, total_steps=total_steps)
    return initialize_engine(model, config=ds_config, optimizer=optimizer,
                             lr_scheduler=scheduler)


def backward(engine, loss: torch.Tensor) -> None:
    """Backward of a loss already normalised by the global count (see module docstring)."""
    engine.backward(loss * world_size(), scale_wrt_gas=False)


def _local_grad_norm(module: nn.Module) -> float:
    """The 2-norm of every gradient together (torch's own reduction: per-tensor norms, no
    squared copy of each gradient)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0)) if grads else 0.0


def optimizer_step(engine) -> float | None:
    """``engine.step()``; at an accumulation boundary returns the global gradient norm
    (before clipping), else None.

    ZeRO stages 1-3 and fp16/bf16 report the norm they clip with; plain fp32 ZeRO-0
    does not, so it is computed from the (already all-reduced) gradients first.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    fallback = None
    if boundary and engine.zero_optimization_stage() == 0:
        fallback = _local_grad_norm(engine.module)
    skipped = engine.skipped_steps
    if fallback is not None and not math.isfinite(fallback):
        _skip_step(engine)
    else:
        engine.step()
    if not boundary:
        return None
    if engine.skipped_steps != skipped:
        return float("nan")  # not applied: the non-finite guard counts it (shared.guard)
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else fallback


def _skip_step(engine) -> None:
    """``engine.step()`` without the update, as DeepSpeed skips an fp16 overflow: the
    gradients are zeroed, the scheduler does not step, ``skipped_steps`` counts it.

    DeepSpeed's ZeRO optimizers (stages 1-3, and bf16 with ``check_grad_overflow``) skip a
    non-finite gradient norm themselves; a plain ZeRO-0 fp32 optimizer does not, so its
    update is replaced by the overflow path here."""
    optimizer = engine.optimizer
    had_overflow = "overflow" in vars(optimizer)
    previous = vars(optimizer).get("overflow")
    optimizer.step = lambda *args, **kwargs: None  # shadows the bound method
    optimizer.overflow = True
    try:
        engine.step()
    finally:
        del optimizer.step
        if had_overflow:
            optimizer.overflow = previous
        else:
            del optimizer.overflow


def current_lr(engine) -> float:
    """The learning rate of the engine's first param group for its next step."""
    return float(engine.get_lr()[0])
