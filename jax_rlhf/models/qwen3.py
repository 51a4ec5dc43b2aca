"""Qwen3: the Llama backbone with per-head RMSNorms of queries and keys, `head_dim` free.

Matches `transformers` `Qwen3Model`: `q_norm` / `k_norm` (RMSNorm over `head_dim`) after the
projections and before RoPE, q/k/v/o biases all or none (`attention_bias`), and, with
`use_sliding_window`, windowed attention on the layers from `max_window_layers` on (HF's
`layer_types`). The backbone is `llama.LlamaModel` with `qk_norm=True`.
"""

from __future__ import annotations

from typing import Any

from jax_rlhf.models import llama
from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.family import Family
from jax_rlhf.models.key_map import FamilySpec, norm

SPEC = FamilySpec(
    backbone=llama.LlamaModel,
    hf_prefix="model.",
    rules=(
        *llama.RULES,
        *norm("layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_norm"),
        *norm("layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_norm"),
    ),
    ignored=(r"rotary_emb\.inv_freq$",),
)


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `Qwen3Config`."""
    bias = bool(hf_config.attention_bias)
    return dict(
        llama.llama_like_fields(hf_config),
        family="qwen3",
        attention_bias=bias,
        attention_out_bias=bias,
        qk_norm=True,
        **llama.windowed_layers(hf_config),
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `Qwen3Config` of `cfg`."""
    import transformers

    return transformers.Qwen3Config(
        **llama.llama_like_hf_fields(cfg),
        attention_bias=cfg.attention_bias,
        **llama.windowed_hf_fields(cfg),
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """What `Qwen3Config` can express."""
    if not cfg.qk_norm:
        raise ValueError("qwen3 always has q/k norms (qk_norm=True)")
    if cfg.mlp_bias or cfg.attention_out_bias != cfg.attention_bias:
        raise ValueError("qwen3: attention biases all or none, no MLP bias")
    if cfg.rope_type not in llama.ROPE_TYPES or cfg.rotary_dim is not None:
        raise ValueError(f"qwen3: rope_type one of {llama.ROPE_TYPES}, no partial rotary")


FAMILY = Family(
    name="qwen3",
    architectures={"qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
