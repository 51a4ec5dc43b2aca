"""Gemma 2 and Gemma 3 (text) backbone: sandwich norms, local/global layers, soft-capping.

Matches `transformers` `Gemma2Model` and `Gemma3TextModel` (`Gemma3ForCausalLM`, model type
`gemma3_text`). On top of Gemma (`gemma.py`: `(1 + weight)` RMSNorms, scaled embeddings,
GeGLU) each block normalises both the input and the output of attention and of the MLP; layer
`i` is local (`layer_types[i] == "sliding_attention"`: a window of `sliding_window` slots) or
global; scores are scaled by `query_pre_attn_scalar**-0.5`.

- Gemma 2: scores soft-capped at `attn_logit_softcapping`; one RoPE base for every layer.
- Gemma 3: per-head q/k norms before RoPE; local layers use `rope_local_theta`, global layers
  `rope_theta`, linearly scaled by `rope_factor` when `rope_type == "linear"`.

The final logit soft-capping (`final_logit_softcapping`) lives in `CausalLM`'s head.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.family import Family, refuse
from jax_rlhf.models.gemma import (
    GemmaModel,
    GemmaRMSNorm,
    default_rope_theta,
    gemma_fields,
    gemma_hf_fields,
)
from jax_rlhf.models.key_map import FamilySpec, embed, linear, norm
from jax_rlhf.models.kv_cache import AttentionContext
from jax_rlhf.models.layers import Attention, GatedMLP, embedding

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def is_sliding(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer `layer` attends locally (HF `layer_types[layer] == "sliding_attention"`)."""
    return cfg.layer_types is not None and cfg.layer_types[layer] == SLIDING


class SandwichBlock(nnx.Module):
    """`x + post_attn_norm(attn(attn_norm(x)))`, then `x + post_mlp_norm(mlp(mlp_norm(x)))`."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        local = is_sliding(cfg, layer)
        hidden = cfg.hidden_size
        self.attn_norm = GemmaRMSNorm(cfg, hidden)
        self.attn = Attention(
            cfg,
            use_rope=True,
            rngs=rngs,
            sliding_window=cfg.sliding_window if local else None,
            scale=cfg.query_pre_attn_scalar**-0.5,
            logit_softcap=cfg.attn_logit_softcapping,
            qk_norm=GemmaRMSNorm if cfg.qk_norm else None,
            rope_theta=cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta,
            rope_factor=cfg.rope_factor if cfg.rope_type == "linear" and not local else 1.0,
        )
        self.post_attn_norm = GemmaRMSNorm(cfg, hidden)
        self.mlp_norm = GemmaRMSNorm(cfg, hidden)
        self.mlp = GatedMLP(cfg, rngs=rngs)
        self.post_mlp_norm = GemmaRMSNorm(cfg, hidden)

    def __call__(
        self,
        x: jax.Array,
        ctx: AttentionContext,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`[B, T, H] -> [B, T, H]`, plus this layer's keys/values for the cache."""
        h, kv = self.attn(self.attn_norm(x), ctx, layer_cache)
        x = x + self.post_attn_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), kv


class Gemma2Model(GemmaModel):
    """Scaled token embedding, sandwich blocks (local or global), final Gemma RMSNorm: Gemma's
    backbone with other blocks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([SandwichBlock(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = GemmaRMSNorm(cfg, cfg.hidden_size)


SPEC = FamilySpec(
    backbone=Gemma2Model,
    hf_prefix="model.",
    rules=(
        *embed("embed_tokens", "embed_tokens"),
        *norm("norm", "final_norm"),
        *norm("layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
        *norm("layers.{i}.post_attention_layernorm", "layers.{i}.post_attn_norm"),
        *norm("layers.{i}.pre_feedforward_layernorm", "layers.{i}.mlp_norm"),
        *norm("layers.{i}.post_feedforward_layernorm", "layers.{i}.post_mlp_norm"),
        *norm("layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_norm"),
        *norm("layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_norm"),
        *linear("layers.{i}.self_attn.q_proj", "layers.{i}.attn.q_proj"),
        *linear("layers.{i}.self_attn.k_proj", "layers.{i}.attn.k_proj"),
        *linear("layers.{i}.self_attn.v_proj", "layers.{i}.attn.v_proj"),
        *linear("layers.{i}.self_attn.o_proj", "layers.{i}.attn.o_proj"),
        *linear("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate_proj"),
        *linear("layers.{i}.mlp.up_proj", "layers.{i}.mlp.up_proj"),
        *linear("layers.{i}.mlp.down_proj", "layers.{i}.mlp.down_proj"),
    ),
    ignored=(r"rotary_emb\.\w*inv_freq$",),
)


def _local_global(hf_config: Any) -> dict[str, Any]:
    """Layer types, window and score options shared by Gemma 2 and Gemma 3."""
    layer_types = tuple(hf_config.layer_types or (FULL,) * hf_config.num_hidden_layers)
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise refuse(hf_config.model_type, "layer_types", unknown, f"only {LAYER_TYPES}")
    if SLIDING in layer_types and not hf_config.sliding_window:
        raise refuse(
            hf_config.model_type,
            "sliding_window",
            hf_config.sliding_window,
            "local layers need a window",
        )
    return dict(
        gemma_fields(hf_config, "gemma2", hf_config.hidden_activation),
        layer_types=layer_types,
        sliding_window=hf_config.sliding_window if SLIDING in layer_types else None,
        query_pre_attn_scalar=hf_config.query_pre_attn_scalar,  # HF: an int
        final_logit_softcapping=hf_config.final_logit_softcapping,
    )


def _hf_local_global(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        gemma_hf_fields(cfg),
        hidden_activation=cfg.activation,
        layer_types=list(cfg.layer_types or (FULL,) * cfg.num_layers),
        sliding_window=cfg.sliding_window,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        final_logit_softcapping=cfg.final_logit_softcapping,
    )


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `Gemma2Config` or a `Gemma3TextConfig`."""
    if hf_config.model_type == "gemma3_text":
        return gemma3_from_hf(hf_config)
    return dict(
        _local_global(hf_config),
        rope_theta=default_rope_theta(hf_config, hf_config.rope_parameters),
        attn_logit_softcapping=hf_config.attn_logit_softcapping,
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `Gemma2Config` (or `Gemma3TextConfig`, by `cfg.model_type`) of `cfg`; `common`
    holds the fields every family shares."""
    import transformers

    if cfg.model_type == "gemma3_text":
        return gemma3_to_hf(cfg, common)
    return transformers.Gemma2Config(
        **_hf_local_global(cfg),
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        **common,
    )


def gemma3_from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `Gemma3TextConfig` (`Gemma3ForCausalLM`, text only).

    Global layers take `rope_type` "default" or "linear" (Gemma 3 4B and larger use linear
    scaling 8); `attn_logit_softcapping` must be None, since HF's Gemma 3 attention ignores it.
    """
    model_type = hf_config.model_type
    if hf_config.attn_logit_softcapping is not None:
        raise refuse(
            model_type,
            "attn_logit_softcapping",
            hf_config.attn_logit_softcapping,
            "HF's Gemma 3 ignores it; only None",
        )
    rope = hf_config.rope_parameters or {}
    global_rope = dict(rope.get(FULL) or {})
    scaling = {}
    if global_rope.get("rope_type") == "linear":
        scaling = dict(rope_type="linear", rope_factor=float(global_rope.pop("factor")))
        global_rope["rope_type"] = "default"
    return dict(
        _local_global(hf_config),
        qk_norm=True,
        rope_theta=default_rope_theta(hf_config, global_rope),
        rope_local_theta=default_rope_theta(hf_config, rope.get(SLIDING)),
        **scaling,
    )


def gemma3_to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `Gemma3TextConfig` of `cfg`; `common` holds the fields every family shares."""
    import transformers

    global_rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "linear":
        global_rope.update(rope_type="linear", factor=cfg.rope_factor)
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    return transformers.Gemma3TextConfig(
        **_hf_local_global(cfg),
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": local_theta},
            FULL: global_rope,
        },
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """What each HF dialect expresses: Gemma 3 has q/k norms, a local RoPE base and may scale
    its global RoPE linearly, but no attention soft-capping; Gemma 2 the opposite."""
    gemma3 = cfg.model_type == "gemma3_text"
    if cfg.qk_norm != gemma3:
        raise ValueError("gemma2 family: qk_norm=True exactly for model_type='gemma3_text'")
    if cfg.query_pre_attn_scalar is None:
        raise ValueError("gemma2 family: query_pre_attn_scalar is required")
    allowed = ("default", "linear") if gemma3 else ("default",)
    if cfg.rope_type not in allowed:
        raise ValueError(f"{cfg.model_type}: rope_type={cfg.rope_type!r} is not one of {allowed}")
    if gemma3 and cfg.attn_logit_softcapping is not None:
        raise ValueError("gemma3_text: attn_logit_softcapping must be None (HF ignores it)")


FAMILY = Family(
    name="gemma2",
    architectures={
        "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
        "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    },
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
