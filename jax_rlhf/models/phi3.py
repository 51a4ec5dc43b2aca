"""Phi-3: the Llama backbone; HF fuses q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`).

Matches `transformers` `Phi3Model`. The fused HF projections are split on import into our
`q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` (and concatenated back on export), so LoRA
targets and sharding rules are those of Llama. Options:

- `partial_rotary_factor` < 1: RoPE on the first `rotary_dim` features of each head.
- `sliding_window`: every layer attends within the window (Phi-3-mini-4k: 2047).
- RoPE "longrope" (alias "su"; the 128k checkpoints): per-frequency short/long factors, the
  long ones for a forward whose longest position reaches `original_max_position_embeddings`
  (HF's `longrope_frequency_update`), cos/sin scaled by the attention factor.

No biases (HF has none). Refused: RoPE types other than default, linear, llama3, longrope.
"""

from __future__ import annotations

import math
from typing import Any

from jax_rlhf.models import llama
from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.family import Family, refuse
from jax_rlhf.models.key_map import SPLIT_FUSED_LINEAR, FamilySpec, Rule, embed, linear, norm

_QKV = tuple(f"layers.{{i}}.attn.{name}.kernel" for name in ("q_proj", "k_proj", "v_proj"))
_GATE_UP = ("layers.{i}.mlp.gate_proj.kernel", "layers.{i}.mlp.up_proj.kernel")

SPEC = FamilySpec(
    backbone=llama.LlamaModel,
    hf_prefix="model.",
    rules=(
        *embed("embed_tokens", "embed_tokens"),
        *norm("norm", "final_norm"),
        *norm("layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
        *norm("layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
        Rule("layers.{i}.self_attn.qkv_proj.weight", _QKV, SPLIT_FUSED_LINEAR),
        *linear("layers.{i}.self_attn.o_proj", "layers.{i}.attn.o_proj"),
        Rule("layers.{i}.mlp.gate_up_proj.weight", _GATE_UP, SPLIT_FUSED_LINEAR),
        *linear("layers.{i}.mlp.down_proj", "layers.{i}.mlp.down_proj"),
    ),
    ignored=(r"rotary_emb\.\w*inv_freq$",),
)

ROPE_TYPES = (*llama.ROPE_TYPES, "longrope")


def _longrope_fields(hf_config: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """Short/long factors, original context and attention factor (derived as HF's
    `_compute_longrope_parameters` when the config leaves it out)."""
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or hf_config.max_position_embeddings / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(
        rope_short_factor=tuple(float(f) for f in rope["short_factor"]),
        rope_long_factor=tuple(float(f) for f in rope["long_factor"]),
        rope_original_max_position_embeddings=original,
        rope_attention_factor=float(attention),
    )


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `Phi3Config`."""
    rope = dict(hf_config.rope_parameters or {})
    if rope.get("rope_type") == "su":
        rope["rope_type"] = "longrope"
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if rotary_dim % 2:
        raise refuse("phi3", "partial_rotary_factor", rope["partial_rotary_factor"],
                     "an even rotary width")
    fields = dict(
        llama.llama_like_fields(hf_config, ROPE_TYPES),
        family="phi3",
        head_dim=head_dim,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        sliding_window=hf_config.sliding_window,
        dropout=float(hf_config.resid_pdrop),
        embedding_dropout=float(hf_config.embd_pdrop),
    )
    if fields["rope_type"] == "longrope":
        fields.update(_longrope_fields(hf_config, rope))
    return fields


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `Phi3Config` of `cfg`."""
    import transformers

    fields = llama.llama_like_hf_fields(cfg)
    fields.pop("head_dim")  # Phi3Config derives it from hidden_size / heads
    rope = llama.rope_parameters(cfg)
    rope["partial_rotary_factor"] = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    if cfg.rope_type == "longrope":
        rope.update(
            short_factor=list(cfg.rope_short_factor),
            long_factor=list(cfg.rope_long_factor),
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
            attention_factor=cfg.rope_attention_factor,
        )
    fields["rope_parameters"] = rope
    original = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    return transformers.Phi3Config(
        **fields,
        original_max_position_embeddings=original,
        sliding_window=cfg.sliding_window,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.embedding_dropout,
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """What `Phi3Config` can express."""
    if cfg.attention_bias or cfg.attention_out_bias or cfg.mlp_bias:
        raise ValueError("phi3 has no biases")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError("phi3 needs head_dim * num_heads == hidden_size")
    if cfg.qk_norm or cfg.layer_types is not None:
        raise ValueError("phi3 has no q/k norms and no per-layer attention types")
    if cfg.rope_type == "longrope" and None in (
        cfg.rope_short_factor, cfg.rope_long_factor, cfg.rope_attention_factor,
        cfg.rope_original_max_position_embeddings,
    ):
        raise ValueError("phi3 longrope needs short/long factors, the original context length "
                         "and the attention factor")


FAMILY = Family(
    name="phi3",
    architectures={"phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
