"""Parameter counts and shapes of a decoder from its Hugging Face config dict, analytically.

``rlhf plan`` (``shared.plan``) needs each model's size without building it: the number of
parameters (weights, gradients and optimiser states scale with it), the largest layer
(DeepSpeed's ZeRO-3 estimator gathers one at a time), the shapes that size the activations
and the KV cache, and the linear layers LoRA adapts. Counted here from the config keys of the
families the project loads (``llama`` and the same-shaped ``mistral`` / ``qwen2``, ``opt``,
``gpt2``); nothing is downloaded or built. ``tests/shared/test_plan.py`` checks
every family against the parameters of the Hugging Face module itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from shared.config import ConfigError
from shared.errors import InputError
from shared.known_models import KNOWN_CONFIGS

__all__ = ["ModelShape", "load_hf_config", "model_shape"]

_LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = (*_LLAMA_LIKE, "opt", "gpt2")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner needs of one model (a causal LM, or its backbone with a value head)."""

    family: str
    params: int
    """Every parameter (a tied embedding counted once)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_layer_params: int
    """The largest single tensor group DeepSpeed gathers at once under ZeRO-3 (here: the
    embedding, or one block when that is larger)."""
    block_linears: tuple[tuple[str, int, int], ...]
    """``(name, in_features, out_features)`` of the linear layers of one block."""
    value_head: bool = False

    def lora_params(self, dim: int, targets: tuple[str, ...] = ()) -> int:
        """Parameters of rank-``dim`` adapters (``A: in x r``, ``B: r x out``) on every block
        linear, or only those whose name is one of ``targets``."""
        chosen = [(i, o) for name, i, o in self.block_linears if not targets or name in targets]
        return self.layers * sum(dim * (i + o) for i, o in chosen)


def load_hf_config(source: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model directory, else of a hub name in the Hugging Face
    cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), else of a hub
    model the shipped configs name (``shared.known_models``). Nothing is downloaded."""
    path = Path(source) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    name = str(source)
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    snapshots = sorted((cache / f"models--{name.replace('/', '--')}" / "snapshots").glob(
        "*/config.json"))
    if snapshots:
        return json.loads(snapshots[-1].read_text())
    if name in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[name])
    raise InputError(f"{source}: no config.json there or in the Hugging Face cache, and not "
                     "a model rlhf plan knows (shared/known_models.py); it never downloads: "
                     "point it at a local directory or set model.actor_config / critic_config")


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ConfigError(f"model config ({config.get('model_type')}): needs one of "
                          f"{', '.join(keys)}")
    return default


def model_shape(config: dict[str, Any], *, value_head: bool = False) -> ModelShape:
    """The :class:`ModelShape` of a Hugging Face config dict; ``value_head``: the reward model
    or critic (DeepSpeed-Chat's backbone plus a 1-wide ``v_head`` instead of the LM head)."""
    family = config.get("model_type")
    if family in _LLAMA_LIKE:
        return _llama(config, value_head, family)
    if family == "opt":
        return _opt(config, value_head)
    if family == "gpt2":
        return _gpt2(config, value_head)
    raise ConfigError(f"model_type {family!r}: rlhf plan counts {', '.join(FAMILIES)}")


def _finish(family: str, config: dict[str, Any], *, embedding: int, extra: int, block: int,
            layers: int, d: int, heads: int, kv: int, head_dim: int, vocab: int, value_head: bool,
            tied_default: bool, linears) -> ModelShape:
    tied = config.get("tie_word_embeddings", tied_default)
    head = d if value_head else (0 if tied else vocab * d)  # DS-Chat's v_head: no bias
    params = embedding + extra + layers * block + head
    return ModelShape(family=family, params=params, layers=layers, hidden=d, heads=heads,
                      kv_heads=kv, head_dim=head_dim, vocab=vocab,
                      largest_layer_params=max(embedding, block, head),
                      block_linears=tuple(linears), value_head=value_head)


def _llama(config: dict[str, Any], value_head: bool, family: str) -> ModelShape:
    d, f = _get(config, "hidden_size"), _get(config, "intermediate_size")
    v, layers = _get(config, "vocab_size"), _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads", default=heads)
    head_dim = config.get("head_dim") or d // heads
    linears = [("q_proj", d, heads * head_dim), ("k_proj", d, kv * head_dim),
               ("v_proj", d, kv * head_dim), ("o_proj", heads * head_dim, d),
               ("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)]
    block = sum(i * o for _, i, o in linears) + 2 * d  # two RMSNorms
    if family == "qwen2":  # q, k, v carry biases
        block += (heads + 2 * kv) * head_dim
    return _finish(family, config, embedding=v * d, extra=d, block=block, layers=layers, d=d,
                   heads=heads, kv=kv, head_dim=head_dim, vocab=v, value_head=value_head,
                   tied_default=False, linears=linears)


def _opt(config: dict[str, Any], value_head: bool) -> ModelShape:
    d, f = _get(config, "hidden_size"), _get(config, "ffn_dim")
    v, layers = _get(config, "vocab_size"), _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    proj = config.get("word_embed_proj_dim") or d
    positions = (_get(config, "max_position_embeddings") + 2) * d  # OPT's offset of 2
    linears = [("q_proj", d, d), ("k_proj", d, d), ("v_proj", d, d), ("out_proj", d, d),
               ("fc1", d, f), ("fc2", f, d)]
    block = sum(i * o + o for _, i, o in linears) + 4 * d  # biases, two LayerNorms
    extra = positions + (2 * d * proj if proj != d else 0)  # project_in / project_out
    if config.get("do_layer_norm_before", True) and proj == d:
        extra += 2 * d  # final LayerNorm (OPT-350m, with its projections, has none)
    return _finish("opt", config, embedding=v * proj, extra=extra, block=block, layers=layers,
                   d=d, heads=heads, kv=heads, head_dim=d // heads, vocab=v,
                   value_head=value_head, tied_default=True, linears=linears)


def _gpt2(config: dict[str, Any], value_head: bool) -> ModelShape:
    d, v = _get(config, "n_embd", "hidden_size"), _get(config, "vocab_size")
    layers, heads = _get(config, "n_layer", "num_hidden_layers"), _get(config, "n_head")
    f = config.get("n_inner") or 4 * d
    linears = [("c_attn", d, 3 * d), ("c_proj", d, d), ("c_fc", d, f), ("mlp.c_proj", f, d)]
    block = sum(i * o + o for _, i, o in linears) + 4 * d  # biases, two LayerNorms
    extra = _get(config, "n_positions", "max_position_embeddings") * d + 2 * d
    return _finish("gpt2", config, embedding=v * d, extra=extra, block=block, layers=layers,
                   d=d, heads=heads, kv=heads, head_dim=d // heads, vocab=v,
                   value_head=value_head, tied_default=True, linears=linears)
