"""GPT-2 backbone: learned positions, pre-LN blocks, GELU (tanh) MLP, final LayerNorm.

Matches `transformers` `GPT2Model`. HF stores GPT-2's projections as `Conv1D` with `[in, out]`
weights (already our kernel layout) and fuses q, k, v into one `c_attn`; the key map splits it.
Positions come from the attention mask as in HF `generate`, so left padding is harmless.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
from jax_rlhf.models.family import Family, require
from jax_rlhf.models.key_map import SPLIT_QKV, FamilySpec, Rule, conv1d, embed, norm
from jax_rlhf.models.layers import MLP, LayerNorm, embedding
from jax_rlhf.models.opt import check_multi_head


class GPT2Model(Backbone):
    """Token and position embeddings, pre-LN blocks, final LayerNorm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.embed_positions = embedding(
            cfg, cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderBlock(cfg, norm=LayerNorm, mlp=MLP, pre_norm=True, use_rope=False, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_norm = LayerNorm(cfg, cfg.hidden_size)

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids) + self.embed_positions(positions)  # [B, T, H]

    def finish(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x)


_QKV = ("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj")

SPEC = FamilySpec(
    backbone=GPT2Model,
    hf_prefix="transformer.",
    rules=(
        *embed("wte", "embed_tokens"),
        *embed("wpe", "embed_positions"),
        *norm("ln_f", "final_norm"),
        *norm("h.{i}.ln_1", "layers.{i}.attn_norm"),
        *norm("h.{i}.ln_2", "layers.{i}.mlp_norm"),
        Rule("h.{i}.attn.c_attn.weight", tuple(f"{p}.kernel" for p in _QKV), SPLIT_QKV),
        Rule("h.{i}.attn.c_attn.bias", tuple(f"{p}.bias" for p in _QKV), SPLIT_QKV),
        *conv1d("h.{i}.attn.c_proj", "layers.{i}.attn.o_proj"),
        *conv1d("h.{i}.mlp.c_fc", "layers.{i}.mlp.up_proj"),
        *conv1d("h.{i}.mlp.c_proj", "layers.{i}.mlp.down_proj"),
    ),
    # Old GPT-2 checkpoints carry the causal-mask buffers `attn.bias` / `attn.masked_bias`.
    ignored=(r"h\.\d+\.attn\.(bias|masked_bias)$",),
)


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `GPT2Config`."""
    require(hf_config, "scale_attn_weights", True)
    require(hf_config, "scale_attn_by_inverse_layer_idx", False)
    require(hf_config, "add_cross_attention", False)
    hidden, heads = hf_config.n_embd, hf_config.n_head
    return dict(
        family="gpt2",
        hidden_size=hidden,
        num_layers=hf_config.n_layer,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf_config.n_inner or 4 * hidden,
        max_position_embeddings=hf_config.n_positions,
        norm_eps=hf_config.layer_norm_epsilon,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        activation=hf_config.activation_function,
        dropout=float(hf_config.resid_pdrop),
        attention_dropout=float(hf_config.attn_pdrop),
        embedding_dropout=float(hf_config.embd_pdrop),
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `GPT2Config` of `cfg`."""
    import transformers

    return transformers.GPT2Config(
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        embd_pdrop=cfg.embedding_dropout,
        **common,
    )


FAMILY = Family(
    name="gpt2",
    architectures={"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check_multi_head,
)
