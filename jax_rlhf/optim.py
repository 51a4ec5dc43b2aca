"""AdamW as both backends configure it (`OptimizerConfig`), with `shared.make_schedule`.

    clip_by_global_norm(max_grad_norm)          # skipped when max_grad_norm == 0
    -> adamw(schedule, b1, b2, eps, weight_decay, mask=decay_mask)

The schedule is the same `shared.schedules` function the torch backend steps, evaluated on
optax's update count (0 for the first update, as `LambdaLR`'s first step). Weight decay skips
biases and norm scales (DeepSpeed-Chat's `get_optimizer_grouped_parameters` no-decay list).
With a LoRA learning rate the adapters get their own AdamW on the same schedule shape
(`optax.multi_transform`); the global-norm clip still sees every gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optax

import shared
from jax_rlhf.models.lora import is_lora_param


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    """The whole update rule (clip, then AdamW)."""
    schedule: Callable[[Any], Any]
    """step -> learning rate of the (non-adapter) parameters, for the `lr` metric."""


def lr_schedule(cfg: Any, *, total_steps: int, base_lr: float | None = None) -> Callable:
    """`shared.make_schedule` for an `OptimizerConfig` (`base_lr` overrides its peak)."""
    return shared.make_schedule(
        cfg.lr_scheduler_type,
        base_lr=cfg.learning_rate if base_lr is None else base_lr,
        warmup_steps=cfg.num_warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )


def decays(name: str) -> bool:
    """Whether AdamW decays the parameter at this dotted path: kernels, embeddings, adapters."""
    return not (name.endswith(".bias") or name.endswith(".scale"))


def _adamw(cfg: Any, schedule: Callable, names: Mapping[str, Any]) -> optax.GradientTransformation:
    b1, b2 = cfg.betas
    return optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: {name: decays(name) for name in params},
    )


def make_optimizer(
    cfg: Any,
    params: Mapping[str, Any],
    *,
    total_steps: int,
    lora_learning_rate: float | None = None,
) -> Optimizer:
    """The optimizer of one model from its `OptimizerConfig` (`params`: the trainable dict).

    `lora_learning_rate` (LoRAConfig.learning_rate) gives adapter parameters their own peak
    learning rate.
    """
    schedule = lr_schedule(cfg, total_steps=total_steps)
    has_lora = any(is_lora_param(name) for name in params)
    if lora_learning_rate is not None and has_lora:
        lora_schedule = lr_schedule(cfg, total_steps=total_steps, base_lr=lora_learning_rate)
        update = optax.multi_transform(
            {"base": _adamw(cfg, schedule, params), "lora": _adamw(cfg, lora_schedule, params)},
            lambda p: {name: "lora" if is_lora_param(name) else "base" for name in p},
        )
    else:
        update = _adamw(cfg, schedule, params)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    return Optimizer(optax.chain(*parts, update), schedule)
