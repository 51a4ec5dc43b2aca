"""Gemma backbone: a Llama with `(1 + weight)` RMSNorms, sqrt(hidden)-scaled embeddings, GeGLU.

Matches `transformers` `GemmaModel`: grouped-query attention with `head_dim` independent of
`hidden_size / heads`, `gelu_pytorch_tanh` gated MLP, tied embeddings. `GemmaRMSNorm` and
`scaled_embedding` are shared with Gemma 2 and Gemma 3 (`gemma2.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
from jax_rlhf.models.family import Family, refuse
from jax_rlhf.models.key_map import FamilySpec, embed, linear, norm
from jax_rlhf.models.layers import GatedMLP, embedding, lookup_tokens


class GemmaRMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * (1 + scale)`, all in float32 and cast at the end.

    `scale` holds HF's zero-centred `weight` (fresh models start at 0, i.e. the identity).
    Unlike `RMSNorm` (Llama casts before multiplying), Gemma multiplies in float32 first.
    """

    def __init__(self, cfg: ModelConfig, dim: int):
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        normed = x32 * jax.lax.rsqrt(variance + self.eps) * (1.0 + scale)
        return normed.astype(self.dtype)


def scaled_embedding(cfg: ModelConfig, embed_tokens: nnx.Embed, input_ids: jax.Array):
    """`[B, T]` ids to `[B, T, H]` embeddings times sqrt(hidden_size), the factor rounded to
    the parameter dtype first as HF's `*TextScaledWordEmbedding` does (bf16: 55.43 -> 55.5);
    lookups of `pad_token_id` pass no gradient (HF `padding_idx`)."""
    x = lookup_tokens(embed_tokens, input_ids, cfg.pad_token_id)  # [B, T, H]
    factor = jnp.asarray(cfg.hidden_size**0.5, jnp.dtype(cfg.param_dtype)).astype(x.dtype)
    return x * factor


class GemmaModel(Backbone):
    """Scaled token embedding, pre-norm blocks (Gemma RMSNorm, GeGLU), final Gemma RMSNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderBlock(
                    cfg, norm=GemmaRMSNorm, mlp=GatedMLP, pre_norm=True, use_rope=True, rngs=rngs
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_norm = GemmaRMSNorm(cfg, cfg.hidden_size)

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        del positions  # RoPE is applied inside attention
        return scaled_embedding(self.config, self.embed_tokens, input_ids)

    def finish(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x)


SPEC = FamilySpec(
    backbone=GemmaModel,
    hf_prefix="model.",
    rules=(
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
    ),
    ignored=(r"rotary_emb\.inv_freq$",),
)


def check_causal(hf_config: Any) -> None:
    """Refuses Gemma's bidirectional (encoder-style) attention."""
    if getattr(hf_config, "use_bidirectional_attention", None):
        raise refuse(hf_config.model_type, "use_bidirectional_attention", True, "only causal")


def default_rope_theta(hf_config: Any, rope: dict | None) -> float:
    """`rope_theta` of a `rope_type="default"` RoPE parameter dict; refuses other types."""
    rope = dict(rope or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise refuse(hf_config.model_type, "rope_type", rope_type, "only 'default'")
    return float(rope.get("rope_theta", 10000.0))


def gemma_fields(hf_config: Any, family: str, activation: str) -> dict[str, Any]:
    """The `ModelConfig` fields every Gemma generation shares."""
    check_causal(hf_config)
    return dict(
        family=family,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        attention_bias=bool(hf_config.attention_bias),
        attention_out_bias=bool(hf_config.attention_bias),
        activation=activation,
        attention_dropout=float(hf_config.attention_dropout or 0.0),
    )


def gemma_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config arguments every Gemma generation shares (the inverse of `gemma_fields`)."""
    return dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.attention_bias,
        attention_dropout=cfg.attention_dropout,
    )


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `GemmaConfig` (Gemma 1)."""
    return dict(
        gemma_fields(hf_config, "gemma", hf_config.hidden_act),
        rope_theta=default_rope_theta(hf_config, hf_config.rope_parameters),
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `GemmaConfig` of `cfg`; `common` holds the fields every family shares."""
    import transformers

    return transformers.GemmaConfig(
        **gemma_hf_fields(cfg),
        hidden_act=cfg.activation,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """Only default RoPE: the reader refuses the other types."""
    if cfg.rope_type != "default":
        raise ValueError(f"gemma: rope_type={cfg.rope_type!r} is not supported (only 'default')")


FAMILY = Family(
    name="gemma",
    architectures={"gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
