"""Llama (and Qwen2) backbone: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP.

Matches `transformers` `LlamaModel` / `Qwen2Model`; positions come from the attention mask
(`cumsum(mask) - 1`), as HF `generate` computes them, so left padding does not shift RoPE.
"""

from __future__ import annotations

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone, DecoderBlock
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


SPEC = FamilySpec(
    backbone=LlamaModel,
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
