"""What every trainer sets up the same way: tokenizer, models from the config, the run log.

A trained or frozen model is described by where it comes from (a directory / hub name,
or ``model.actor_config`` / ``critic_config`` to build one fresh, seeded by ``seed``) and
by a ``ModuleConfig`` (dropout, gradient checkpointing, LoRA).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shared.config import ModuleConfig, RLHFConfig
from shared.model_limits import ROLE_CONFIG, ModelLimits, check_model, read_model_limits
from shared.runlog import RunLogger
from torch_rlhf.distributed import barrier, is_main
from torch_rlhf.lora import apply_lora
from torch_rlhf.models import build_causal_lm, build_value_model, load_tokenizer

__all__ = ["build_model", "lora_settings", "open_run_logger", "open_session",
           "resolve_tokenizer"]

logger = logging.getLogger(__name__)


def resolve_tokenizer(config: RLHFConfig, model_name_or_path: str | None = None):
    """``model.tokenizer_name_or_path``, else the model's own directory."""
    path = config.model.tokenizer_name_or_path or model_name_or_path
    if path is None:
        raise ValueError("model.tokenizer_name_or_path: null is invalid when the model is "
                         "built from a config (no directory to read a tokenizer from)")
    from shared.data import prepare_tokenizer

    tokenizer = load_tokenizer(
        path, end_of_conversation_token=config.data.end_of_conversation_token,
        trust_remote_code=config.model.trust_remote_code)
    return prepare_tokenizer(tokenizer, pad_with_eos=config.data.pad_with_eos)


def lora_settings(module: ModuleConfig) -> dict[str, Any] | None:
    """The LoRA settings checkpoints record (None when LoRA is off)."""
    lora = module.lora
    if lora.dim == 0:
        return None
    return {"dim": lora.dim, "alpha": lora.alpha, "module_name": lora.module_name,
            "target_modules": list(lora.target_modules), "only_optimize": lora.only_optimize}


def build_model(kind: str, config: RLHFConfig, tokenizer, *, name_or_path: str | None,
                config_dict: Mapping[str, Any] | None, module: ModuleConfig | None = None,
                ds_config: Mapping[str, Any] | None = None, trainable: bool = True):
    """A causal LM (``kind="causal_lm"``) or ValueModel (``"value"``) for the config.

    Args:
      name_or_path: load weights from here; else build fresh from ``config_dict``. Either
        way ``torch.manual_seed(config.seed)`` comes first, so every rank (and every run)
        initialises what is not loaded identically.
      module: dropout, gradient checkpointing and LoRA of a trained model; None for a
        frozen one (dropout off, no LoRA).
      ds_config: the engine's DeepSpeed config; under ZeRO-3 the weights are partitioned
        while loading, except with LoRA (peft needs the full base weights to wrap them;
        DeepSpeed partitions the model when the engine is built).
      trainable: False freezes every parameter (reference and reward models).
    """
    if kind not in ("causal_lm", "value"):
        raise ValueError(f"kind: {kind!r} is invalid; allowed: causal_lm, value")
    # The tokenizer and the data lengths must fit the model (shared.model_limits; never a
    # resize): checked before loading when its config can be read, else once it is built.
    role = "actor" if kind == "causal_lm" else "critic"
    limits = (read_model_limits(name_or_path) if name_or_path else
              ModelLimits.from_hf_config(config_dict or {}, ROLE_CONFIG[role]))
    fits = dict(tokenizer_size=len(tokenizer), tokenizer_name=tokenizer.name_or_path or None)
    check_model(limits, config.data, role, **fits)
    module = module or ModuleConfig()
    lora = module.lora if trainable else None
    # Seeded for every build: a fresh model, or a fresh value head on a causal-LM backbone.
    torch.manual_seed(config.seed)
    build = build_causal_lm if kind == "causal_lm" else build_value_model
    model = build(
        name_or_path, config_dict=None if name_or_path else config_dict,
        dtype=config.model.dtype, dropout=module.dropout if trainable else None,
        disable_dropout=module.disable_dropout if trainable else True,
        gradient_checkpointing=module.gradient_checkpointing and trainable,
        trust_remote_code=config.model.trust_remote_code,
        # with data.pad_with_eos the model keeps its own pad id (its embedding's padding_idx),
        # as DeepSpeed-Chat sets the tokenizer's pad only after building the model
        pad_token_id=None if config.data.pad_with_eos else tokenizer.pad_token_id,
        ds_config=None if lora is not None and lora.dim else ds_config)
    if limits is None:
        built = ModelLimits.from_hf_config(model.config.to_dict(), name_or_path)
        check_model(built, config.data, role, **fits)
    if lora is not None and lora.dim:
        apply_lora(model, dim=lora.dim, alpha=lora.alpha, module_name=lora.module_name,
                   target_modules=lora.target_modules, only_optimize=lora.only_optimize,
                   seed=config.seed)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def open_run_logger(config: RLHFConfig, run_dir: str | Path) -> RunLogger:
    """The run's metrics.jsonl / TensorBoard writer (writes on rank 0 only); creates
    ``run_dir`` if needed."""
    if is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    return RunLogger.from_config(config, run_dir, is_main=is_main())


def open_session(config: RLHFConfig, run_dir: str | Path):
    """What the steps of a ``shared.pipeline`` run share on this backend: one run logger."""
    from shared.pipeline import Session

    run_logger = open_run_logger(config, run_dir)
    return Session(run_logger, {"run_logger": run_logger}, barrier)
