"""Llama family: Llama and Qwen2 (one backbone, one key map, two HF config dialects).

Backbone: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP; matches `transformers`
`LlamaModel` / `Qwen2Model`. Positions come from the attention mask (`cumsum(mask) - 1`), as HF
`generate` computes them, so left padding does not shift RoPE. Qwen2 is Llama with q/k/v biases
and no output-projection bias.
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
    """Token embedding, pre-RMSNorm blocks with RoPE attention, final RMSNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderBlock(
                    cfg, norm=RMSNorm, mlp=GatedMLP, pre_norm=True, use_rope=True, rngs=rngs
                )
                for _ in range(cfg.num_layers)
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


def rope_theta(hf_config: Any) -> float:
    """RoPE base of an HF config with default RoPE; refuses scaled RoPE types."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise refuse(hf_config.model_type, "rope_type", rope_type, "only 'default'")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def llama_like_fields(hf_config: Any) -> dict[str, Any]:
    """The `ModelConfig` fields every Llama-like HF config spells the same way."""
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
        rope_theta=rope_theta(hf_config),
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
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.attention_dropout,
    )


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `LlamaConfig` or `Qwen2Config`."""
    if hf_config.model_type == "qwen2":
        require(hf_config, "use_sliding_window", False)
        return dict(llama_like_fields(hf_config), attention_bias=True)
    require(hf_config, "pretraining_tp", 1)
    return dict(
        llama_like_fields(hf_config),
        attention_bias=hf_config.attention_bias,
        attention_out_bias=hf_config.attention_bias,
        mlp_bias=hf_config.mlp_bias,
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `LlamaConfig` or `Qwen2Config` (by `cfg.model_type`) of `cfg`."""
    import transformers

    if cfg.model_type == "qwen2":
        return transformers.Qwen2Config(**llama_like_hf_fields(cfg), **common)
    return transformers.LlamaConfig(
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        **llama_like_hf_fields(cfg),
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """Biases each HF dialect can express: Llama all or none on attention, Qwen2 q/k/v only."""
    if cfg.model_type == "qwen2":
        if (cfg.attention_bias, cfg.attention_out_bias, cfg.mlp_bias) != (True, False, False):
            raise ValueError("qwen2 has q/k/v biases only (attention_bias=True, "
                             "attention_out_bias=False, mlp_bias=False)")
    elif cfg.attention_out_bias != cfg.attention_bias:
        raise ValueError("llama: attention_out_bias must equal attention_bias (Qwen2's q/k/v-only "
                         "biases need model_type='qwen2')")


FAMILY = Family(
    name="llama",
    architectures={
        "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    },
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
