"""GPT-NeoX (Pythia) backbone: parallel residual, partial rotary, fused per-head q/k/v.

Matches `transformers` `GPTNeoXModel`: LayerNorms with biases, exact-erf GELU MLP with biases,
RoPE on the first `rotary_dim = int(head_dim * rotary_pct)` features of each head, and
`use_parallel_residual` blocks `x + attn(ln1(x)) + mlp(ln2(x))` (Pythia) or sequential ones.
The fused `query_key_value` projection is kept in HF's layout, `[H, heads * 3 * head_dim]`
with q, k and v interleaved per head (HF `view(..., heads, 3 * head_dim).chunk(3)`), so the
key map is a plain transpose and LoRA targets it by its HF name.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone
from jax_rlhf.models.family import Family, refuse
from jax_rlhf.models.key_map import FamilySpec, embed, linear, norm
from jax_rlhf.models.kv_cache import AttentionContext
from jax_rlhf.models.layers import MLP, Attention, LayerNorm, dense, embedding


class NeoXAttention(Attention):
    """`Attention` with HF's fused, per-head interleaved `query_key_value` projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, use_rope=True, rngs=rngs, rotary_dim=cfg.rotary_dim)
        self.q_proj = self.k_proj = self.v_proj = None  # replaced by the fused projection
        width = 3 * cfg.num_heads * cfg.head_dim
        self.query_key_value = dense(
            cfg, cfg.hidden_size, width, use_bias=cfg.attention_bias, rngs=rngs
        )

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch, length, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        qkv = self.query_key_value(x).reshape(batch, length, heads, 3, head_dim)  # [B,T,N,3,D]
        q = qkv[:, :, :, 0, None, :]  # [B, T, N, 1, D]: every head is its own kv group
        return q, qkv[:, :, :, 1], qkv[:, :, :, 2]  # keys, values [B, T, N, D]


class NeoXBlock(nnx.Module):
    """Pre-LN attention and MLP, summed in parallel (`use_parallel_residual`) or in sequence."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.parallel = cfg.use_parallel_residual
        self.attn_norm = LayerNorm(cfg, cfg.hidden_size)
        self.attn = NeoXAttention(cfg, rngs=rngs)
        self.mlp_norm = LayerNorm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        ctx: AttentionContext,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`[B, T, H] -> [B, T, H]`, plus this layer's keys/values for the cache."""
        attn, kv = self.attn(self.attn_norm(x), ctx, layer_cache)
        if self.parallel:
            return self.mlp(self.mlp_norm(x)) + attn + x, kv  # HF's order of the sum
        x = attn + x
        return self.mlp(self.mlp_norm(x)) + x, kv


class GPTNeoXModel(Backbone):
    """Token embedding (`embed_in`), NeoX blocks, final LayerNorm; no position table."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = embedding(cfg, cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([NeoXBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = LayerNorm(cfg, cfg.hidden_size)

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        del positions  # RoPE is applied inside attention
        return self.embed_tokens(input_ids)  # [B, T, H]; HF's embed_in has no padding_idx

    def finish(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x)


SPEC = FamilySpec(
    backbone=GPTNeoXModel,
    hf_prefix="gpt_neox.",
    rules=(
        *embed("embed_in", "embed_tokens"),
        *norm("final_layer_norm", "final_norm"),
        *norm("layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
        *norm("layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
        *linear("layers.{i}.attention.query_key_value", "layers.{i}.attn.query_key_value"),
        *linear("layers.{i}.attention.dense", "layers.{i}.attn.o_proj"),
        *linear("layers.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.up_proj"),
        *linear("layers.{i}.mlp.dense_4h_to_h", "layers.{i}.mlp.down_proj"),
    ),
    # Pythia checkpoints carry the causal-mask buffers and RoPE's inv_freq.
    ignored=(r"attention\.(bias|masked_bias)$", r"rotary_emb\.inv_freq$"),
)


def from_hf(hf_config: Any) -> dict[str, Any]:
    """`ModelConfig` fields of a `GPTNeoXConfig`; refuses what `GPTNeoXModel` here lacks."""
    rope = dict(hf_config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise refuse("gpt_neox", "rope_type", rope["rope_type"], "only 'default'")
    heads = hf_config.num_attention_heads
    head_dim = hf_config.hidden_size // heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if rotary_dim % 2:
        raise refuse(
            "gpt_neox",
            "rotary_pct",
            rope.get("partial_rotary_factor"),
            f"the rotated width int(head_dim * rotary_pct) = {rotary_dim} must be even",
        )
    return dict(
        family="gpt_neox",
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.layer_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        attention_bias=bool(hf_config.attention_bias),
        attention_out_bias=bool(hf_config.attention_bias),
        mlp_bias=True,
        activation=hf_config.hidden_act,
        use_parallel_residual=bool(hf_config.use_parallel_residual),
        dropout=float(hf_config.hidden_dropout),
        attention_dropout=float(hf_config.attention_dropout),
    )


def to_hf(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The `GPTNeoXConfig` of `cfg`; `common` holds the fields every family shares (vocabulary,
    special tokens, tying, dtype, architectures)."""
    import transformers

    rotary_dim = cfg.rotary_dim or cfg.head_dim
    pct = rotary_dim / cfg.head_dim
    if int(cfg.head_dim * pct) != rotary_dim:
        raise ValueError(f"gpt_neox: rotary_dim={rotary_dim} is not expressible as rotary_pct")
    return transformers.GPTNeoXConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.activation,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=cfg.use_parallel_residual,
        attention_bias=cfg.attention_bias,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": pct,
        },
        **common,
    )


def check(cfg: ModelConfig) -> None:
    """Only default RoPE: the reader refuses the other types."""
    if cfg.rope_type != "default":
        raise ValueError(f"gpt_neox: rope_type={cfg.rope_type!r} is not supported (only 'default')")


FAMILY = Family(
    name="gpt_neox",
    architectures={"gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")},
    from_hf=from_hf,
    to_hf=to_hf,
    spec=SPEC,
    check=check,
)
