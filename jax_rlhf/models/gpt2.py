"""GPT-2 backbone: learned positions, pre-LN blocks, GELU (tanh) MLP, final LayerNorm.

Matches `transformers` `GPT2Model`. HF stores GPT-2's projections as `Conv1D` with `[in, out]`
weights (already our kernel layout) and fuses q, k, v into one `c_attn`; the key map splits it.
Positions come from the attention mask as in HF `generate`, so left padding is harmless.
"""

from __future__ import annotations

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
from jax_rlhf.models.key_map import SPLIT_QKV, FamilySpec, Rule, conv1d, embed, norm
from jax_rlhf.models.layers import MLP, LayerNorm, embedding


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
