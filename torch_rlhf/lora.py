"""LoRA through peft: which modules to adapt, injection, and merged weights for saving.

DeepSpeed-Chat's ``convert_linear_layer_to_lora`` rule (a substring of the module's
qualified name) chooses the modules; peft's ``inject_adapter_in_model`` adds the
adapters to the ordinary Hugging Face model, so nothing else changes type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from torch_rlhf.models import ValueModel

__all__ = ["apply_lora", "lora_target_names", "merged_state_dict"]


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed Linear

    return (nn.Linear, Conv1D)


def _output_heads(model: nn.Module) -> list[nn.Module]:
    hf = model.model if isinstance(model, ValueModel) else model
    heads = [getattr(hf, "score", None), getattr(hf, "lm_head", None)]
    if hasattr(hf, "get_output_embeddings"):
        heads.append(hf.get_output_embeddings())
    return [h for h in heads if h is not None]


def lora_target_names(model: nn.Module, module_name: str) -> list[str]:
    """Qualified names of the Linear (and GPT-2 Conv1D) modules containing ``module_name``.

    The substring rule of DS-Chat's ``convert_linear_layer_to_lora``; output heads
    (``lm_head``, the value ``score``) are never adapted.
    """
    heads = {id(h) for h in _output_heads(model)}
    return [name for name, module in model.named_modules()
            if module_name in name and isinstance(module, _adaptable_types())
            and id(module) not in heads]


def apply_lora(model: nn.Module, *, dim: int, alpha: float = 1.0,
               module_name: str = "decoder.layers.", target_modules: Sequence[str] = (),
               only_optimize: bool = False, seed: int = 0) -> nn.Module:
    """Inject peft LoRA adapters in place and set which parameters train.

    The update of an adapted weight is ``(alpha / dim) * B @ A`` (A Kaiming-uniform from
    ``shared.lora_init.lora_a_init`` keyed by ``seed`` and the module name, as in the JAX
    backend; B zero, so the model is unchanged at first). As in DeepSpeed-Chat, adapted weights are
    frozen while their biases and all other parameters keep training, unless
    ``only_optimize``, which freezes everything but the adapters and a ValueModel's score
    head (the critic's head must learn).

    Args:
      model: a causal LM or a :class:`ValueModel` (not yet inside a DeepSpeed engine).
      dim: the rank, > 0.
      alpha: peft ``lora_alpha``.
      module_name: substring selecting modules by qualified name (DS-Chat's
        ``--actor_lora_module_name``, e.g. "decoder.layers." for OPT, "layers." for Llama).
      target_modules: explicit module-name suffixes (peft matching); override module_name.
      only_optimize: train only the adapters (DS-Chat ``--only_optimize_lora``).
      seed: keys the adapters' A matrices (the run's ``seed``).

    Returns:
      the same ``model`` object.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if dim <= 0:
        raise ValueError(f"dim must be > 0 to apply LoRA, got {dim}")
    targets = list(target_modules) or lora_target_names(model, module_name)
    if not targets:
        raise ValueError(f"no Linear module of {type(model).__name__} has {module_name!r} in its "
                         "name; set lora.module_name (e.g. 'layers.') or lora.target_modules")
    matched = [m for n, m in model.named_modules()
               if any(n == t or n.endswith("." + t) for t in targets)]
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in matched)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    value_head = (set(map(id, model.model.score.parameters()))
                  if isinstance(model, ValueModel) else set())
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    inject_adapter_in_model(config, model)
    _init_adapters(model, seed)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
        elif only_optimize:
            param.requires_grad_(id(param) in value_head)
        else:
            adapted = name.endswith(".base_layer.weight")
            param.requires_grad_(not adapted and name.replace(".base_layer.", ".") in trainable)
    if only_optimize and hasattr(model, "enable_input_require_grads"):
        # Reentrant checkpointing needs an input that requires grad (DS-Chat
        # make_model_gradient_checkpointing_compatible).
        model.enable_input_require_grads()
    return model


def _init_adapters(model: nn.Module, seed: int) -> None:
    """Every adapter's A from ``shared.lora_init.lora_a_init`` keyed by (seed, kind, HF module
    name), as the JAX backend draws it; B stays zero (peft)."""
    from peft.tuners.lora import LoraLayer

    from shared.lora_init import lora_a_init

    kind = "value" if isinstance(model, ValueModel) else "causal_lm"
    prefix = "model." if isinstance(model, ValueModel) else ""
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for linear in module.lora_A.values():
            rank, in_features = linear.weight.shape
            a = lora_a_init(seed, kind, name.removeprefix(prefix), rank, in_features)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(a).to(linear.weight.dtype))


def merged_state_dict(model: nn.Module,
                      state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (or ``state``, a dict with the same keys, e.g. an EMA of
    them) with every LoRA adapter merged into its base weight.

    Nothing in ``model`` changes (merging in place and unmerging later would drift in
    bf16); the result has the keys of the model without adapters.
    """
    own = state is None
    state = model.state_dict() if own else state
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return state
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = f"{name}.base_layer.weight"
        weight = merged[key]
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if own:
                delta = module.get_delta_weight(adapter)
            else:  # peft's get_delta_weight on the given A and B
                delta = (state[f"{name}.lora_B.{adapter}.weight"]
                         @ state[f"{name}.lora_A.{adapter}.weight"]) * module.scaling[adapter]
                delta = delta.T if module.fan_in_fan_out else delta
            weight = weight + delta.to(weight.dtype)
        merged[key] = weight
    return {k.replace(".base_layer.", "."): v for k, v in merged.items()}
