"""Level 4: N optimiser steps in both backends, each with its own optimiser construction.

    rows = optimiser_rows(path, batches, optim)     # path: an HF causal-LM directory

torch: `torch_rlhf.optim.build_train_engine` (DeepSpeed engine, ZeRO-0, fp32: AdamW over
`param_groups` (no decay on biases and norm weights), the shared schedule as `LambdaLR`,
DeepSpeed's `gradient_clipping`), stepped with `torch_rlhf.optim.backward` / `optimizer_step`.
JAX: `jax_rlhf.optim.make_optimizer` (clip_by_global_norm -> adamw with the no-decay mask and
the shared schedule) through `jax_rlhf.train.step.init_train_state` / `apply_gradients`.
Both minimise the SFT loss (`objectives.sft_objective`) on the same batches, one per step.

After every step the rows compare the loss, the learning rate and the pre-clip gradient norm;
after the last, every parameter under its HF state-dict name (JAX through the converter's
`to_state_dict`, as level 3 compares gradients).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_tests import objectives as obj
from parity_tests.harness import Row, compare, compare_grads, to_jax, to_numpy, to_torch

__all__ = ["LEVEL4_OPTIM", "ensure_torch_distributed", "optimiser_rows", "split_key_biases",
           "torch_state_dict"]

LEVEL4_OPTIM = dict(learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="cosine",
                    num_warmup_steps=1, min_lr_ratio=0.1, betas=(0.9, 0.95), eps=1e-8,
                    max_grad_norm=0.5)
"""A schedule, decay and clip that all bind within 3 steps on the tiny models: warmup then
cosine to 10 %, lr 1e-2 (weights move ~1e-2 per step, 5 % of their std 0.2), decay 0.1 and a
clip well below the SFT gradient norm (~3 on the tiny Llama)."""


def ensure_torch_distributed() -> None:
    """A one-process gloo world for the DeepSpeed engines (a no-op when there is one)."""
    import logging

    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def torch_state_dict(module: Any) -> dict[str, np.ndarray]:
    """HF names -> numpy of a torch model's parameters (a ValueModel's `model.` dropped; LoRA
    adapters merged into their base weights, as the saved model has them)."""
    from torch_rlhf.lora import merged_state_dict
    from torch_rlhf.models import ValueModel, unwrap_model

    module = unwrap_model(module)
    prefix = "model." if isinstance(module, ValueModel) else ""
    params = dict(module.named_parameters())
    if any(".lora_" in name for name in params):  # LoRA: adapters merged, base-model names
        params = {k: v for k, v in merged_state_dict(module).items() if v.is_floating_point()}
    return {name.removeprefix(prefix): to_numpy(p) for name, p in params.items()}


@functools.lru_cache(maxsize=8)
def _jax_step(mdef: Any, optim: Any, total_steps: int):
    import jax

    from jax_rlhf.optim import make_optimizer
    from jax_rlhf.train.step import apply_gradients

    def step(state, batch):
        opt = make_optimizer(optim, state.params, total_steps=total_steps)

        def loss_fn(params):
            model = mdef.merge(params, state.frozen)
            return obj.sft_objective(lambda ids, mask: model(ids, mask)[0], batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        lr = opt.schedule(state.step)
        state, norm = apply_gradients(state, grads, opt.tx)
        return state, {"loss": loss, "lr": lr, "grad_norm": norm}

    return jax.jit(step)


def _jax_run(path: Path, batches: Sequence[Mapping[str, np.ndarray]], optim: Any,
             total_steps: int) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    from jax_rlhf.models import load_causal_lm, to_state_dict
    from jax_rlhf.params import ModelDef
    from jax_rlhf.sharding import make_mesh
    from jax_rlhf.train.step import init_train_state

    mdef, params, frozen = ModelDef.split(load_causal_lm(path))
    opt_tx = _make_tx(optim, params, total_steps)
    state = init_train_state(params, frozen, opt_tx, make_mesh())
    step = _jax_step(mdef, optim, total_steps)
    metrics = []
    for batch in batches:
        state, m = step(state, to_jax(batch))
        metrics.append({k: float(v) for k, v in m.items()})
    weights = to_state_dict(mdef.merge(state.params, state.frozen))
    return metrics, {k: to_numpy(v) for k, v in weights.items()}


def _make_tx(optim: Any, params: Any, total_steps: int):
    from jax_rlhf.optim import make_optimizer

    return make_optimizer(optim, params, total_steps=total_steps).tx


def _torch_run(path: Path, batches: Sequence[Mapping[str, np.ndarray]], optim: Any,
               total_steps: int) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    import torch

    from shared.config import LoRAConfig
    from torch_rlhf.models import build_causal_lm, causal_lm_logits
    from torch_rlhf.optim import (
        backward,
        build_train_engine,
        current_lr,
        optimizer_step,
        train_ds_config,
    )

    ensure_torch_distributed()
    model = build_causal_lm(str(path), dtype="fp32")
    ds_config = train_ds_config(optim=optim, stage=0, offload=False, dtype="fp32",
                                micro_batch_size=len(batches[0]["input_ids"]),
                                gradient_accumulation_steps=1)
    engine = build_train_engine(model, ds_config=ds_config, optim=optim, lora=LoRAConfig(),
                                total_steps=total_steps)
    engine.train()
    metrics = []
    for batch in batches:
        lr = current_lr(engine)
        loss, _ = obj.sft_objective(lambda ids, mask: causal_lm_logits(engine, ids, mask),
                                    to_torch(batch))
        backward(engine, loss)
        norm = optimizer_step(engine)
        metrics.append({"loss": float(loss.detach()), "lr": lr, "grad_norm": float(norm)})
    with torch.no_grad():
        weights = torch_state_dict(engine)
    return metrics, weights


def optimiser_rows(path: str | Path, batches: Sequence[Mapping[str, np.ndarray]], *,
                   optim: Any = None, label: str = "sft", total_steps: int | None = None
                   ) -> list[Row]:
    """Level 4: `len(batches)` optimiser steps from the HF causal LM at `path` in both
    backends; per step the loss, learning rate and gradient norm, then every parameter.

    Args:
      optim: a `shared.config.OptimizerConfig` (default `LEVEL4_OPTIM`).
      total_steps: the schedule's N (default: the number of batches).
    """
    from shared.config import OptimizerConfig

    optim = optim or OptimizerConfig(**LEVEL4_OPTIM)
    total_steps = total_steps or len(batches)
    t_metrics, t_weights = _torch_run(Path(path), batches, optim, total_steps)
    j_metrics, j_weights = _jax_run(Path(path), batches, optim, total_steps)
    rows = []
    for i, (t, j) in enumerate(zip(t_metrics, j_metrics, strict=True)):
        rows.append(compare("4", f"{label} step {i} loss", j["loss"], t["loss"], "loss"))
        rows.append(compare("4", f"{label} step {i} lr", j["lr"], t["lr"], "shared_fp32"))
        rows.append(compare("4", f"{label} step {i} grad_norm", j["grad_norm"], t["grad_norm"],
                            "loss"))
    num_heads = json.loads((Path(path) / "config.json").read_text()).get("num_attention_heads")
    j_weights, j_noise = split_key_biases(j_weights, num_heads=num_heads)
    t_weights, t_noise = split_key_biases(t_weights, num_heads=num_heads)
    rows.append(compare_grads("4", f"{label} params after {len(batches)} steps", j_weights,
                              t_weights, "optimiser_params"))
    if t_noise or j_noise:
        rows.append(compare_grads("4", f"{label} key biases after {len(batches)} steps",
                                  j_noise, t_noise, "optimiser_zero_grad"))
    return rows


def split_key_biases(weights: Mapping[str, np.ndarray], *, num_heads: int | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(every other parameter, the attention key biases).

    The loss does not depend on a key bias b_k: it adds q . b_k to every score of a query,
    which the softmax removes, so its exact gradient is 0 and both backends compute rounding
    noise (~1e-9). Adam divides that noise by its own RMS (plus eps 1e-8) and moves the bias
    by up to ~lr per step in a direction set by the noise: the two backends' key biases then
    differ by O(lr) without any backend difference (tolerance `optimiser_zero_grad`). OPT's
    `k_proj.bias` is split off whole, the key third of GPT-2's fused `c_attn.bias`
    (q, k, v) as `<name>[k]`; the q and v thirds stay with the other parameters. GPT-NeoX's
    fused `query_key_value.bias` interleaves q, k, v per head (`[heads, 3, head_dim]`): with
    `num_heads` its k parts are split off the same way.
    """
    rest, noise = {}, {}
    for name, value in weights.items():
        if name.endswith("k_proj.bias"):
            noise[name] = value
        elif name.endswith("attn.c_attn.bias"):
            width = value.shape[0] // 3
            rest[name + "[q, v]"] = np.concatenate([value[:width], value[2 * width:]])
            noise[name + "[k]"] = value[width:2 * width]
        elif name.endswith("attention.query_key_value.bias") and num_heads:
            per_head = value.reshape(num_heads, 3, -1)  # [heads, (q, k, v), head_dim]
            rest[name + "[q, v]"] = per_head[:, [0, 2]].reshape(-1)
            noise[name + "[k]"] = per_head[:, 1].reshape(-1)
        else:
            rest[name] = value
    return rest, noise
