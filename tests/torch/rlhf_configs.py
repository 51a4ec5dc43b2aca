"""Tiny run configs for the trainer tests: the demo's data and tokenizer, small batches.

``write_config(tmp_path, overrides)`` writes ``tmp_path/config.yaml`` as ``base:
configs/demo.yaml`` plus ``TINY`` plus ``overrides`` (nested dicts, merged) and returns
its path and the loaded config, so the same file serves in-process trainers and
``python -m shared.cli`` subprocesses.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from shared.config import RLHFConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
DEMO_TOKENIZER = REPO_ROOT / "configs" / "demo" / "tokenizer"

TINY: dict[str, Any] = {
    "logging": {"progress_bar": False, "enable_tensorboard": False},
    "sft": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64, "max_steps": 2,
            "num_train_epochs": 1},
    "reward": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
               "max_steps": 2, "num_train_epochs": 1},
    "ppo": {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4,
            "max_iterations": 1, "ppo_epochs": 1, "num_train_epochs": 1},
    "eval": {"max_prompts": 8, "samples_per_prompt": 1},
}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(directory: Path, overrides: dict[str, Any] | None = None, *,
                 name: str = "config.yaml") -> tuple[Path, RLHFConfig]:
    """``directory/name`` = demo + TINY + overrides; returns (path, loaded config)."""
    data = merge({"base": str(DEMO), "output_dir": str(directory / "runs")}, TINY)
    data = merge(data, overrides or {})
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, load_config(path)


def family_models(model_dir: str) -> dict[str, Any]:
    """The ``model:`` section for a saved tiny model serving as actor and critic."""
    return {"model": {"actor_model_name_or_path": model_dir,
                      "critic_model_name_or_path": model_dir,
                      "tokenizer_name_or_path": str(DEMO_TOKENIZER),
                      "actor_config": None, "critic_config": None}}
