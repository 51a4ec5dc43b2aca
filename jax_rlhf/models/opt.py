"""OPT backbone: learned positions (offset 2), LayerNorm, ReLU MLP, pre- or post-LN blocks.

Matches `transformers` `OPTDecoder`, including the OPT-350m shape: post-LN blocks
(`do_layer_norm_before=False`, hence no final LayerNorm) and a `word_embed_proj_dim`-wide token
embedding projected in to `hidden_size` and back out before the LM head.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
from jax_rlhf.models.family import Family, require
from jax_rlhf.models.key_map import TRANSPOSE, FamilySpec, Rule, embed, linear, norm
from jax_rlhf.models.layers import MLP, LayerNorm, dense, embedding, lookup_tokens

POSITION_OFFSET = 2
"""OPT's position table has two extra leading rows (fairseq's padding convention)."""


class OPTModel(Backbone):
    """Token (+ projection) and position embeddings, OPT blocks, optional final LayerNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        hidden, embed_dim = cfg.hidden_size, cfg.embed_dim
        self.embed_tokens = embedding(cfg, cfg.vocab_size, embed_dim, rngs=rngs)
        self.embed_positions = embedding(
            cfg, cfg.max_position_embeddings + POSITION_OFFSET, hidden, rngs=rngs
        )
        projected = embed_dim != hidden
        self.project_in = (
            dense(cfg, embed_dim, hidden, use_bias=False, rngs=rngs) if projected else None
        )
        self.project_out = (
            dense(cfg, hidden, embed_dim, use_bias=False, rngs=rngs) if projected else None
        )
        self.layers = nnx.List(
            [
                DecoderBlock(
                    cfg,
                    norm=LayerNorm,
                    mlp=MLP,
                    pre_norm=cfg.do_layer_norm_before,
                    use_rope=False,
                    rngs=rngs,
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_norm = LayerNorm(cfg, hidden) if cfg.do_layer_norm_before else None

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        x = lookup_tokens(self.embed_tokens, input_ids, self.config.pad_token_id)  # [B, T, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, H]
        return x + self.embed_positions(positions + POSITION_OFFSET)

    def finish(self, x: jax.Array) -> jax.Array:
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, T, E]
        return x


SPEC = FamilySpec(
    backbone=OPTModel,
    hf_prefix="model.",
    rules=(
        *embed("decoder.embed_tokens", "embed_tokens"),
        *embed("decoder.embed_positions", "embed_positions"),
        Rule("decoder.project_in.weight", "project_in.kernel", TRANSPOSE),
        Rule("decoder.project_out.weight", "project_out.kernel", TRANSPOSE),
        *norm("decoder.final_layer_norm", "final_norm"),
        *norm("decoder.layers.{i}.self_attn_layer_norm", "layers.{i}.attn_norm"),
        *norm("decoder.layers.{i}.final_layer_norm", "layers.{i}.mlp_norm"),
        *linear("decoder.layers.{i}.self_attn.q_proj", "layers.{i}.attn.q_proj"),
        *linear("decoder.layers.{i}.self_attn.k_proj", "layers.{i}.attn.k_proj"),
        *linear("decoder.layers.{i}.self_attn.v_proj", "layers.{i}.attn.v_proj"),
        *linear("decoder.layers.{i}.self_attn.out_proj", "layers.{i}.attn.o_proj"),
        *linear("decoder.layers.{i}.fc1", "layers.{i}.mlp.up_proj"),
        *linear("decoder.layers.{i}.fc2", "layers.{i}.mlp.down_proj"),
    ),
)


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of an `OPTConfig`."""
    require(hf_config, "enable_bias", True)
    require(hf_config, "layer_norm_elementwise_affine", True)
    require(hf_config, "_remove_final_layer_norm", False)
    heads = hf_config.num_attention_heads
    proj = hf_config.word_embed_proj_dim
    return dict(
        family="opt",
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf_config.hidden_size // heads,
        intermediate_size=hf_config.ffn_dim,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=1e-5,  # torch.nn.LayerNorm default; OPTConfig has no epsilon field
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        activation=hf_config.activation_function,
        do_layer_norm_before=hf_config.do_layer_norm_before,
        word_embed_proj_dim=None if proj in (None, hf_config.hidden_size) else proj,
        dropout=float(hf_config.dropout),
        attention_dropout=float(hf_config.attention_dropout),
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `OPTConfig` of `cfg`."""
    import transformers

    return transformers.OPTConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        ffn_dim=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        do_layer_norm_before=cfg.do_layer_norm_before,
        word_embed_proj_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_function=cfg.activation,
        **common,
    )


def check_multi_head(cfg: ModelConfig) -> None:
    """Plain multi-head attention (OPT, GPT-2): no grouped-query heads, no free head_dim."""
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(f"family {cfg.family!r} has no grouped-query attention")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"family {cfg.family!r} needs head_dim * num_heads == hidden_size")


FAMILY = Family(
    name="opt",
    architectures={"opt": ("OPTForCausalLM", "OPTForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check_multi_head,
)
