"""What the data may hold for a model: token ids within its embedding, lengths within its context.

A token id at or past the token embedding's rows, or a position at or past the position
table, is out of range: the JAX backend reads NaN there (and trains every weight to NaN), the
torch backend raises a bare IndexError or CUDA assert. Both backends therefore check the same
two rules, with these functions, before any batch reaches a model:

- **vocabulary**: the run's tokenizer (`len(tokenizer)`, added tokens included) must fit the
  token embedding of every model (`vocab_size`). Neither backend resizes embeddings: new rows
  cannot be drawn identically by both, and a resized model is not the one on disk. A fresh
  model takes a larger `vocab_size` in `model.actor_config` / `critic_config`; a saved one is
  resized once, outside the run (transformers: `model.resize_token_embeddings(n)`).
- **context**: `data.max_seq_len` (SFT and reward sequences) and `data.max_prompt_seq_len +
  data.max_answer_seq_len` (PPO rollouts, ptx blocks, held-out generation) must fit every
  model's context (`max_position_embeddings`, GPT-2's `n_positions`). Both models see both
  lengths in a full pipeline (the SFT model becomes the PPO actor, the reward model the critic),
  so both are checked against both.

The limits come from the Hugging Face `config.json` (read with `json`, never transformers) of
a local model directory or the hub cache, or from the inline `model.actor_config` /
`critic_config` (the transformers default of its `model_type` for a key it leaves out). The
config loader checks the context of every model it can read; the backends check the tokenizer
and the context when they build models (torch: each model as built; JAX: the config's models
when the run's tokenizer is loaded). Errors are `ConfigError`s naming the keys and sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from shared.config._build import ConfigError

__all__ = [
    "HF_DEFAULTS",
    "ModelLimits",
    "check_config_models",
    "check_context",
    "check_model",
    "check_vocab",
    "config_model_limits",
    "read_model_limits",
]

CONTEXT_KEYS = ("max_position_embeddings", "n_positions")
"""Hugging Face config keys holding the longest sequence, in the order they are looked up."""

HF_DEFAULTS: dict[str, dict[str, int]] = {
    "llama": {"vocab_size": 32000, "max_position_embeddings": 2048},
    "opt": {"vocab_size": 50272, "max_position_embeddings": 2048},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768},
}
"""transformers' defaults (LlamaConfig, OPTConfig, GPT2Config, Qwen2Config) for an inline
config that leaves a size out."""

ROLE_CONFIG = {"actor": "model.actor_config", "critic": "model.critic_config"}


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """A model's token-embedding rows and context, and where they were read."""

    source: str
    """The model directory / hub name, or the config key of an inline config."""
    vocab_size: int | None
    """Rows of the token embedding; None when unknown."""
    context: int | None
    """Longest sequence (positions); None when unknown."""
    context_key: str = "max_position_embeddings"
    """The Hugging Face key `context` was read from."""

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any], source: str) -> ModelLimits:
        """The limits in a Hugging Face config dict (its model type's defaults filling gaps)."""
        sizes = {**HF_DEFAULTS.get(str(hf_config.get("model_type")), {}), **hf_config}
        context_key = next((k for k in CONTEXT_KEYS if sizes.get(k) is not None),
                           CONTEXT_KEYS[0])
        return cls(source, _int(sizes.get("vocab_size")), _int(sizes.get(context_key)),
                   context_key)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _config_json(name_or_path: str) -> str | None:
    """The path of `config.json` in a local directory or the hub cache; None when neither
    holds one (nothing is downloaded)."""
    local = os.path.join(name_or_path, "config.json")
    if os.path.isdir(name_or_path):
        return local if os.path.isfile(local) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id (e.g. a directory not written yet)
        return None
    return cached if isinstance(cached, str) else None


def read_model_limits(name_or_path: str) -> ModelLimits | None:
    """The limits in the `config.json` of a model directory or cached hub model; None when
    there is none to read (a hub model not downloaded yet, a directory a step writes later)."""
    path = _config_json(str(name_or_path))
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the model config ({err})") from None
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{path}: the model config is not a JSON object")
    return ModelLimits.from_hf_config(hf_config, str(name_or_path))


def config_model_limits(config: Any, role: str) -> ModelLimits | None:
    """The limits of the config's actor or critic (`role`) as a step builds it: its directory
    (`model.<role>_model_name_or_path`), else its inline `model.<role>_config`, else for the
    critic the actor's directory (a fresh value head on it); None when they cannot be read."""
    model = config.model
    path = getattr(model, f"{role}_model_name_or_path")
    inline = getattr(model, f"{role}_config")
    if path is None and inline is None and role == "critic":
        path = model.actor_model_name_or_path
    if path is not None:
        return read_model_limits(path)
    if inline is not None:
        return ModelLimits.from_hf_config(inline, ROLE_CONFIG[role])
    return None


def _lengths(data: Any) -> list[tuple[str, str, int]]:
    """(keys, how the length is made, length) of every sequence length the data produces."""
    p, a = data.max_prompt_seq_len, data.max_answer_seq_len
    return [
        ("data.max_seq_len", str(data.max_seq_len), data.max_seq_len),
        ("data.max_prompt_seq_len + data.max_answer_seq_len", f"{p} + {a}", p + a),
    ]


def check_context(limits: ModelLimits, data: Any, role: str) -> None:
    """Raises a ConfigError when a sequence length of `data` (a `DataConfig`) exceeds the
    model's context, naming the keys, the lengths and the model."""
    if limits.context is None:
        return
    for keys, made, length in _lengths(data):
        if length > limits.context:
            value = made if made == str(length) else f"{made} = {length}"
            raise ConfigError(
                f"{keys} = {value} exceeds the context of the {role} model ({limits.source}: "
                f"{limits.context_key} = {limits.context}); positions past it are out of "
                f"range. Lower {'them' if ' + ' in keys else 'it'} to at most "
                f"{limits.context}{' in total' if ' + ' in keys else ''}, or use a model with "
                "a longer context"
            )


def check_vocab(limits: ModelLimits, tokenizer_size: int, role: str,
                tokenizer_name: str | None = None) -> None:
    """Raises a ConfigError when the tokenizer has more tokens than the model's embedding has
    rows, naming both sizes, the model and what to change."""
    rows = limits.vocab_size
    if rows is None or tokenizer_size <= rows:
        return
    named = f" {tokenizer_name}" if tokenizer_name else ""
    fix = (f"set {limits.source}.vocab_size >= {tokenizer_size}"
           if limits.source in ROLE_CONFIG.values()
           else "resize the model's embeddings once and save it (transformers: "
                f"model.resize_token_embeddings({tokenizer_size}))")
    ids = (f"token id {rows} is" if tokenizer_size == rows + 1
           else f"token ids {rows}..{tokenizer_size - 1} are")
    raise ConfigError(
        f"the tokenizer{named} has {tokenizer_size} tokens but the {role} model "
        f"({limits.source}) has {rows} token-embedding rows (vocab_size = {rows}): {ids} out "
        f"of range. Neither backend resizes embeddings; use a tokenizer that fits, or {fix}"
    )


def check_model(limits: ModelLimits | None, data: Any, role: str, *,
                tokenizer_size: int | None = None, tokenizer_name: str | None = None) -> None:
    """`check_context` and, with a tokenizer size, `check_vocab` (nothing when `limits` is
    None: they could not be read)."""
    if limits is None:
        return
    check_context(limits, data, role)
    if tokenizer_size is not None:
        check_vocab(limits, tokenizer_size, role, tokenizer_name)


def check_config_models(config: Any, *, tokenizer_size: int | None = None,
                        tokenizer_name: str | None = None,
                        extra_paths: tuple[str | None, ...] = ()) -> None:
    """Checks the config's actor and critic (`config_model_limits`) and any model directory
    in `extra_paths` (a trainer's explicit model) against the data lengths and, when given,
    the tokenizer size."""
    for role in ("actor", "critic"):
        check_model(config_model_limits(config, role), config.data, role,
                    tokenizer_size=tokenizer_size, tokenizer_name=tokenizer_name)
    for path in extra_paths:
        if path is not None:
            check_model(read_model_limits(str(path)), config.data, "trainer's",
                        tokenizer_size=tokenizer_size, tokenizer_name=tokenizer_name)
