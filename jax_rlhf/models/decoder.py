"""The decoder block and the backbone skeleton that the Llama, OPT and GPT-2 modules fill in.

A family differs only in its embeddings (`embed`), its final projection (`finish`), its norm and
MLP types, and whether blocks normalise before (pre-LN) or after (post-LN, OPT-350m) each residual.
"""

from __future__ import annotations

import jax
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.kv_cache import AttentionContext, KVCache, attention_context
from jax_rlhf.models.layers import MLP, Attention, GatedMLP, LayerNorm, RMSNorm


class DecoderBlock(nnx.Module):
    """Attention then MLP, each inside a residual; norms before (pre-LN) or after (post-LN).

    `sliding_window` restricts this layer's attention to the last W key slots; `qk_norm` norms
    queries and keys per head (`Attention`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        norm: type[RMSNorm] | type[LayerNorm],
        mlp: type[GatedMLP] | type[MLP],
        pre_norm: bool,
        use_rope: bool,
        rngs: nnx.Rngs,
        sliding_window: int | None = None,
        qk_norm: type[RMSNorm] | None = None,
    ):
        self.pre_norm = pre_norm
        self.attn_norm = norm(cfg, cfg.hidden_size)
        self.attn = Attention(
            cfg, use_rope=use_rope, rngs=rngs, sliding_window=sliding_window, qk_norm=qk_norm
        )
        self.mlp_norm = norm(cfg, cfg.hidden_size)
        self.mlp = mlp(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        ctx: AttentionContext,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`[B, T, H] -> [B, T, H]`, plus this layer's keys/values for the cache."""
        h = self.attn_norm(x) if self.pre_norm else x
        h, kv = self.attn(h, ctx, layer_cache)
        x = x + h
        if not self.pre_norm:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_norm else x
        x = x + self.mlp(h)
        if not self.pre_norm:
            x = self.mlp_norm(x)
        return x, kv


class Backbone(nnx.Module):
    """Token ids to final hidden states; subclasses define `embed`, `finish` and `layers`.

    Subclasses must set `self.config`, `self.embed_tokens` (an `nnx.Embed`, also the tied LM
    head) and `self.layers` (an `nnx.List` of `DecoderBlock`). Setting `remat = True` on an
    instance (`set_remat`) recomputes each block's activations in the backward pass
    (`nnx.remat`, gradient checkpointing) in cache-free calls, i.e. training forwards.
    """

    config: ModelConfig
    embed_tokens: nnx.Embed
    layers: nnx.List
    remat: bool = False

    def embed(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """`[B, T]` ids and positions to `[B, T, hidden_size]` block inputs."""
        raise NotImplementedError

    def finish(self, x: jax.Array) -> jax.Array:
        """`[B, T, hidden_size]` block outputs to `[B, T, embed_dim]` final hidden states."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, embed_dim]` and the updated cache (None without one).

        Args:
          input_ids: `[B, T]` int token ids (the new tokens only when decoding with a cache).
          attention_mask: `[B, T]` 1 for real tokens, 0 for padding, aligned with `input_ids`.
          positions: `[B, T]` position ids; by default `cumsum(mask) - 1` counted from the first
            real token of the row, including tokens already in `cache`.
          cache: a `KVCache`; the new tokens are written at `cache.index`.
        """
        ctx = attention_context(attention_mask, cache, positions)
        x = self.embed(input_ids, ctx.positions)  # [B, T, H]
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            if cache is None and self.remat:
                x, (k, v) = nnx.remat(_block_forward)(layer, x, ctx)
            else:
                layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
                x, (k, v) = layer(x, ctx, layer_cache)
            new_keys.append(k)
            new_values.append(v)
        if cache is not None:
            cache = KVCache(
                keys=tuple(new_keys),
                values=tuple(new_values),
                mask=ctx.kv_mask,
                index=cache.index + input_ids.shape[1],
            )
        return self.finish(x), cache  # [B, T, E]


def _block_forward(
    layer: DecoderBlock, x: jax.Array, ctx: AttentionContext
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return layer(x, ctx)


def set_remat(model: nnx.Module, enabled: bool = True) -> None:
    """Turns gradient checkpointing on (or off) for every backbone inside `model`."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Backbone):
            module.remat = enabled
