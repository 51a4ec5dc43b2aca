"""PyTorch + DeepSpeed backend: Hugging Face models, DeepSpeed configs, rollouts.

Importing the package is cheap: each public name below is re-exported lazily, so torch,
transformers and DeepSpeed load on first use (``from torch_rlhf import generate``).

- ``torch_rlhf.models``: tokenizers, causal LMs, value models, LoRA, saving, ZeRO-3 gathers.
- ``torch_rlhf.deepspeed_config``: DeepSpeed JSON configs, distributed set-up, engines.
- ``torch_rlhf.generation``: the parity sampler and the rollout-path choice (Hybrid Engine
  or module).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # models
    "ValueModel": "models",
    "apply_lora": "models",
    "build_causal_lm": "models",
    "build_value_model": "models",
    "causal_lm_logits": "models",
    "check_reward_tokenizer": "models",
    "gather_end_values": "models",
    "gather_params_for": "models",
    "load_tokenizer": "models",
    "lora_target_names": "models",
    "position_ids_from_mask": "models",
    "save_hf": "models",
    "torch_dtype": "models",
    "unwrap_model": "models",
    # deepspeed_config
    "HybridEngineUnavailable": "deepspeed_config",
    "init_distributed": "deepspeed_config",
    "initialize_engine": "deepspeed_config",
    "make_ds_config": "deepspeed_config",
    "make_eval_ds_config": "deepspeed_config",
    "reference_zero_stage": "deepspeed_config",
    # generation
    "GenerationOutput": "generation",
    "generate": "generation",
    "generate_rollout": "generation",
    "generation_output_from_hf": "generation",
    "select_rollout_path": "generation",
    "try_hybrid_engine_generate": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torch_rlhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
