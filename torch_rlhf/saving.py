"""ZeRO-3 parameter gathering and Hugging Face saving of (possibly sharded) models."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torch_rlhf.lora import merged_state_dict
from torch_rlhf.models import ValueModel, unwrap_model

__all__ = ["gather_params_for", "gather_params_for_forward", "is_main_process", "save_hf",
           "save_hf_state_dict"]


def _params_to_gather(model: nn.Module, *, for_update: bool) -> list[nn.Parameter]:
    # ZeRO-3 marks each parameter with ds_id / ds_status / ds_persist. Reading needs only
    # the ones not materialised now. An update must also go through the ones that are
    # materialised but not persistent (e.g. kept after a forward): releasing them later
    # would drop the change, while GatheredParameters' exit writes it into the shards.
    # Persistent (small) parameters are full on every rank and are updated in place.
    if for_update:
        return [p for p in model.parameters()
                if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    return [p for p in model.parameters()
            if hasattr(p, "ds_id") and getattr(p.ds_status, "name", "") == "NOT_AVAILABLE"]


@contextlib.contextmanager
def gather_params_for(model: nn.Module, *, modifier_rank: int | None = None) -> Iterator[None]:
    """Materialise the full parameters of a ZeRO-3 model inside the block; no-op otherwise.

    Every rank must enter it (it all-gathers). ``modifier_rank``: the rank whose in-place
    changes are kept, broadcast and re-partitioned on exit (e.g. 0 for an EMA update);
    None for read-only use. Holds the whole model on every rank for the duration.
    """
    params = _params_to_gather(unwrap_model(model), for_update=modifier_rank is not None)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def gather_params_for_forward(model: nn.Module) -> Iterator[None]:
    """Materialise a ZeRO-3 engine's full parameters for forwards run inside the block (a
    decode: N forwards on one gather); no-op without ZeRO-3 parameters.

    :func:`gather_params_for` alone is for reading weights: a forward inside it still runs
    the engine's ZeRO-3 fetch / release hooks, which release the gathered parameters after
    each layer (DeepSpeed 0.19.8 caches its release decisions per module and step, and the
    cache outlives the forward-only trace of an earlier rollout), fetch them again on the
    next forward and, along a training step's recorded trace, prefetch the backward's; a
    prefetch still in flight when the block ends fails the re-partition (DeepSpeed's
    "Cannot partition a param in flight": the rollout after a training step, once the
    model exceeds ``stage3_max_live_parameters`` / the prefetch bucket).
    Here the engine's parameters are first all released (nothing left in flight or
    half-held), then gathered, and the hooks are lifted for the block and re-registered
    after it (DeepSpeed re-records its fetch trace at the next forward), as DeepSpeed's
    own ``unwrap_model_for_generation`` does. Every rank must enter it; read-only.

    Args:
      model: the DeepSpeed engine. Its bare module is refused (ValueError): the hooks
        to lift are the engine's.
    """
    module = unwrap_model(model)
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        yield
        return
    offload = _zero3_offload(model)
    if offload is None:
        if hasattr(module, "ds_id"):  # set on each submodule a ZeRO-3 engine hooks
            raise ValueError(f"gather_params_for_forward needs the DeepSpeed engine, got its "
                             f"module ({type(module).__name__}): the ZeRO-3 hooks to lift "
                             "during the forwards are the engine's")
        with gather_params_for(module):  # ZeRO-3 parameters without an engine: no hooks
            yield
        return
    import deepspeed

    offload.empty_partition_cache()  # waits for in-flight fetches, releases every parameter
    _remove_zero3_hooks(offload)
    try:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield
    finally:
        register = (getattr(offload, "_register_deepspeed_module", None)
                    or offload._register_hooks_recursively)  # deepspeed < 0.16.4
        register(offload.module)


def _zero3_offload(model: nn.Module) -> Any:
    """The object holding a ZeRO-3 engine's module hooks (``DeepSpeedZeRoOffload``): the
    stage-3 optimizer's ``parameter_offload``, or the optimizer slot itself for an engine
    without one (reference, reward model); None for anything else."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None or not isinstance(model, deepspeed.DeepSpeedEngine):
        return None
    optimizer = model.optimizer
    offload = getattr(optimizer, "parameter_offload", optimizer)
    return offload if hasattr(offload, "forward_hooks") else None


def _remove_zero3_hooks(offload: Any) -> None:
    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def is_main_process() -> bool:
    """True on rank 0, or when torch.distributed is not initialised."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_hf(model: nn.Module, tokenizer, out_dir: str) -> None:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face directory of safetensors.

    Accepts a causal LM, a :class:`ValueModel` (saved as its sequence-classification
    model) or a DeepSpeed engine around either. LoRA adapters are merged into the saved
    weights without touching the live model. Under ZeRO-3 every rank must call this (the
    parameters are all-gathered); rank 0 writes.
    """
    module = unwrap_model(model)
    hf = module.model if isinstance(module, ValueModel) else module
    with gather_params_for(module):
        if is_main_process():
            hf.save_pretrained(out_dir, state_dict=merged_state_dict(hf))
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)


def save_hf_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], tokenizer,
                       out_dir: str, *, dtype: torch.dtype | None = None) -> None:
    """Write ``state_dict`` (keys of the model without LoRA) in ``model``'s HF layout.

    For weights that are not the model's own, e.g. the actor's EMA: ``model`` supplies
    the config and file layout. Every rank must call this under ZeRO-3; rank 0 writes.
    """
    module = unwrap_model(model)
    hf = module.model if isinstance(module, ValueModel) else module
    tensors = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in state_dict.items()}
    with gather_params_for(module):
        if is_main_process():
            hf.save_pretrained(out_dir, state_dict=tensors)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
