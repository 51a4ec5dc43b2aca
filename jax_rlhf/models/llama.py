"""Llama family: Llama, Mistral and Qwen2 (one backbone, one key map, three HF config dialects).

Backbone: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP; matches `transformers`
`LlamaModel`, `MistralModel` and `Qwen2Model`. Positions come from the attention mask
(`cumsum(mask) - 1`), as HF `generate` computes them, so left padding does not shift RoPE.

- Llama: RoPE types "default", "linear" and "llama3" (Llama 3.1-3.3); biases all or none.
- Mistral: Llama without biases, optionally with `sliding_window` on every layer.
- Qwen2: q/k/v biases only; `use_sliding_window` windows the layers from `max_window_layers`
  on (HF's `layer_types`).

The backbone also serves Qwen3 (`qwen3.py`: per-head q/k norms) and Phi-3 (`phi3.py`: fused
projections in HF, split here). Refused: "dynamic", "yarn" and the other RoPE types, partial
rotary, Llama `pretraining_tp` > 1.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
from jax_rlhf.models.family import Family, refuse, require
from jax_rlhf.models.key_map import FamilySpec, embed, linear, norm
from jax_rlhf.models.layers import GatedMLP, RMSNorm, embedding, lookup_tokens


class LlamaModel(Backbone):
    """Token embedding, pre-RMSNorm blocks with RoPE attention, final RMSNorm.

    Layer `i` attends within `cfg.layer_window(i)` when set; `cfg.qk_norm` adds Qwen3's q/k
    RMSNorms."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderBlock(
                    cfg,
                    norm=RMSNorm,
                    mlp=GatedMLP,
                    pre_norm=True,
                    use_rope=True,
                    rngs=rngs,
                    sliding_window=cfg.layer_window(i),
                    qk_norm=RMSNorm if cfg.qk_norm else None,
                )
                for i in range(cfg.num_layers)
            ]
        )
        self.final_norm = RMSNorm(cfg, cfg.hidden_size)

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        del positions  # RoPE is applied inside attention
        return lookup_tokens(self.embed_tokens, input_ids, self.config.pad_token_id)  # [B, T, H]

    def finish(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x)


RULES = (
        *embed("embed_tokens", "embed_tokens"),
        *norm("norm", "final_norm"),
        *norm("layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
        *norm("layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
        *linear("layers.{i}.self_attn.q_proj", "layers.{i}.attn.q_proj"),
        *linear("layers.{i}.self_attn.k_proj", "layers.{i}.attn.k_proj"),
        *linear("layers.{i}.self_attn.v_proj", "layers.{i}.attn.v_proj"),
        *linear("layers.{i}.self_attn.o_proj", "layers.{i}.attn.o_proj"),
        *linear("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate_proj"),
        *linear("layers.{i}.mlp.up_proj", "layers.{i}.mlp.up_proj"),
        *linear("layers.{i}.mlp.down_proj", "layers.{i}.mlp.down_proj"),
)
"""HF `LlamaModel` keys (relative to "model.") -> our paths; reused by Llama-like families."""

SPEC = FamilySpec(
    backbone=LlamaModel, hf_prefix="model.", rules=RULES, ignored=(r"rotary_emb\.inv_freq$",)
)


ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE types the Llama-like dialects accept (Phi-3 adds "longrope")."""


def rope_fields(hf_config: Any, supported: tuple[str, ...] = ROPE_TYPES) -> dict[str, Any]:
    """`ModelConfig` RoPE fields of an HF config's `rope_parameters`; refuses other types and
    partial rotary (the Llama attention rotates the whole head)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    model_type = hf_config.model_type
    if rope_type not in supported:
        raise refuse(model_type, "rope_type", rope_type, f"supported: {supported}")
    fields = dict(
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rope_type=rope_type,
    )
    if "longrope" not in supported and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(model_type, "partial_rotary_factor", rope["partial_rotary_factor"], "only 1")
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    return fields


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF `rope_parameters` of `cfg` (the inverse of `rope_fields` for the Llama types)."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
    return rope


def llama_like_fields(hf_config: Any, rope_types: tuple[str, ...] = ROPE_TYPES) -> dict[str, Any]:
    """The `ModelConfig` fields every Llama-like HF config spells the same way (RoPE types
    outside `rope_types` refused)."""
    heads = hf_config.num_attention_heads
    return dict(
        family="llama",
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        **rope_fields(hf_config, rope_types),
        activation=hf_config.hidden_act,
        attention_dropout=float(hf_config.attention_dropout),
    )


def llama_like_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config arguments of `llama_like_fields` (its inverse)."""
    return dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.activation,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        attention_dropout=cfg.attention_dropout,
    )


def windowed_layers(hf_config: Any) -> dict[str, Any]:
    """`sliding_window` / `layer_types` of a Qwen2/Qwen3 config (HF 5 derives `layer_types`
    from `use_sliding_window` and `max_window_layers`); both None when no layer is windowed."""
    window = hf_config.sliding_window  # HF sets it to None unless use_sliding_window
    layer_types = tuple(getattr(hf_config, "layer_types", None) or ())
    if window is None or "sliding_attention" not in layer_types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=layer_types)


def windowed_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    """HF Qwen2/Qwen3 arguments of `windowed_layers` (its inverse)."""
    if cfg.sliding_window is None:
        return dict(use_sliding_window=False)
    layer_types = cfg.layer_types or ("sliding_attention",) * cfg.num_layers
    first = layer_types.index("sliding_attention")
    return dict(
        use_sliding_window=True,
        sliding_window=cfg.sliding_window,
        max_window_layers=first,
        layer_types=list(layer_types),
    )


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `LlamaConfig`, `MistralConfig` or `Qwen2Config`."""
    if hf_config.model_type == "qwen2":
        return dict(llama_like_fields(hf_config), attention_bias=True, **windowed_layers(hf_config))
    if hf_config.model_type == "mistral":
        window = hf_config.sliding_window
        window = None if window is None else int(window)
        return dict(llama_like_fields(hf_config), sliding_window=window)
    require(hf_config, "pretraining_tp", 1)
    return dict(
        llama_like_fields(hf_config),
        attention_bias=hf_config.attention_bias,
        attention_out_bias=hf_config.attention_bias,
        mlp_bias=hf_config.mlp_bias,
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `LlamaConfig`, `MistralConfig` or `Qwen2Config` (by `cfg.model_type`) of `cfg`."""
    import transformers

    if cfg.model_type == "qwen2":
        return transformers.Qwen2Config(
            **llama_like_hf_fields(cfg), **windowed_hf_fields(cfg), **common
        )
    if cfg.model_type == "mistral":
        return transformers.MistralConfig(
            **llama_like_hf_fields(cfg), sliding_window=cfg.sliding_window, **common
        )
    return transformers.LlamaConfig(
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        **llama_like_hf_fields(cfg),
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """What each HF dialect can express: biases, windows, q/k norms."""
    biases = (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias)
    if cfg.model_type == "qwen2" and biases != (True, False, False):
        raise ValueError("qwen2 has q/k/v biases only (attention_bias=True, "
                         "attention_out_bias=False, mlp_bias=False)")
    if cfg.model_type == "mistral" and any(biases):
        raise ValueError("mistral has no biases")
    if cfg.model_type == "llama" and cfg.attention_out_bias != cfg.attention_bias:
        raise ValueError("llama: attention_out_bias must equal attention_bias (Qwen2's q/k/v-only "
                         "biases need model_type='qwen2')")
    if cfg.sliding_window is not None and cfg.model_type == "llama":
        raise ValueError("llama has no sliding window (model_type='mistral' or 'qwen2' has)")
    if cfg.layer_types is not None and cfg.model_type != "qwen2":
        raise ValueError(f"{cfg.model_type}: per-layer layer_types are a Qwen2 option here")
    if cfg.qk_norm or cfg.rope_type not in ROPE_TYPES or cfg.rotary_dim is not None:
        raise ValueError("llama family: no q/k norms (Qwen3), longrope or partial rotary (Phi-3)")


FAMILY = Family(
    name="llama",
    architectures={
        "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
        "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    },
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
