"""PyTorch + DeepSpeed backend: the three RLHF steps on Hugging Face models (docs/torch.md).

Importing the package is cheap: each public name below is re-exported lazily, so torch,
transformers and DeepSpeed load on first use (``from torch_rlhf import PPOTrainer``).

- ``torch_rlhf.models``: tokenizers, causal LMs, value models (reward model / critic).
- ``torch_rlhf.lora``, ``torch_rlhf.saving``: peft LoRA; ZeRO-3 gathers and HF saving.
- ``torch_rlhf.deepspeed_config``: DeepSpeed JSON configs, distributed set-up, engines.
- ``torch_rlhf.generation``: the parity sampler and the rollout-path choice (Hybrid Engine
  or module).
- ``torch_rlhf.optim``: AdamW groups, the shared LR schedules, split-invariant steps.
- ``torch_rlhf.sft``, ``torch_rlhf.reward``, ``torch_rlhf.ppo``: the trainers of steps 1-3
  (``torch_rlhf.supervised``: the torch side of ``shared.supervised_loop``);
  ``torch_rlhf.engine``: the four PPO models (DS-Chat's DeepSpeedRLHFEngine).
- ``torch_rlhf.checkpoint``: resumable checkpoints and their export;
  ``torch_rlhf.evaluation``: the held-out metric; ``torch_rlhf.cli``: ``rlhf`` on this
  backend (the pipeline itself is ``shared.pipeline``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # models
    "ValueModel": "models",
    "build_causal_lm": "models",
    "build_value_model": "models",
    "causal_lm_logits": "models",
    "check_reward_tokenizer": "models",
    "gather_end_values": "models",
    "load_tokenizer": "models",
    "position_ids_from_mask": "models",
    "torch_dtype": "models",
    "unwrap_model": "models",
    # lora, saving
    "apply_lora": "lora",
    "lora_target_names": "lora",
    "gather_params_for": "saving",
    "save_hf": "saving",
    # trainers
    "SFTTrainer": "sft",
    "RewardTrainer": "reward",
    "PPOTrainer": "ppo",
    "RLHFEngine": "engine",
    "heldout_metrics": "evaluation",
    "CheckpointManager": "checkpoint",
    "export_checkpoint": "checkpoint",
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
