"""Static-shape key/value cache and the per-call attention context derived from masks.

The cache is pre-allocated to `[B, max_len, kv_heads, head_dim]` per layer and written at one
shared slot index, so a jitted decode step never changes shape. It also remembers which slots hold
real tokens (`mask`), so left-padded prompts stay masked for the whole generation and positions
continue from the number of real tokens seen, exactly as a full forward over the concatenated
sequence computes them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for `B` sequences of at most `max_len` tokens.

    Writing past `max_len` is not checked (it cannot be under `jit`; `dynamic_update_slice`
    would clamp): size the cache for the prompt plus every token to be generated.
    """

    keys: tuple[jax.Array, ...]
    """Per layer `[B, max_len, kv_heads, head_dim]`, RoPE already applied (Llama)."""
    values: tuple[jax.Array, ...]
    """Per layer `[B, max_len, kv_heads, head_dim]`."""
    mask: jax.Array
    """`[B, max_len]` bool: the slot holds a real (non-padding) token."""
    index: jax.Array
    """`[]` int32: the next slot to write; the same for every row."""

    @classmethod
    def init(
        cls,
        *,
        batch_size: int,
        max_len: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype,
    ) -> KVCache:
        """An empty cache: zero keys/values, no valid slot, write index 0."""
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            mask=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


class AttentionContext(NamedTuple):
    """What every layer of one forward call needs besides its input activations."""

    allowed: jax.Array
    """`[B, T, S]` bool: query `t` may attend to key slot `s` (causal and not padding)."""
    positions: jax.Array
    """`[B, T]` int32 position ids of the new tokens."""
    kv_mask: jax.Array
    """`[B, S]` bool: valid key slots after this call (the new cache mask)."""
    index: jax.Array | int
    """Slot of the first new token (0 without a cache)."""


def positions_from_mask(
    attention_mask: jax.Array, past_tokens: jax.Array | None = None
) -> jax.Array:
    """Position ids `cumsum(mask) - 1` clipped at 0, as docs/architecture.md fixes them for
    both backends: left padding gets 0, right padding the last real token's position.

    Real tokens get the positions HF `generate` gives them; padding positions only matter for
    outputs read at padding (DeepSpeed-Chat's pairwise reward loss does), where they now agree
    with the torch backend.

    Args:
      attention_mask: `[B, T]`, 1 for real tokens, 0 for padding (left or right).
      past_tokens: `[B]` real tokens already in the cache, or None.
    Returns:
      `[B, T]` int32; the t-th real token of a row gets position `past_tokens + t`.
    """
    mask = attention_mask.astype(bool)
    positions = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1  # [B, T]
    if past_tokens is not None:
        positions = positions + past_tokens[:, None].astype(jnp.int32)
    return jnp.maximum(positions, 0)


def attention_context(
    attention_mask: jax.Array,
    cache: KVCache | None,
    positions: jax.Array | None = None,
) -> AttentionContext:
    """Masks and positions for `T` new tokens, written at `cache.index` when there is a cache.

    Without a cache the keys are the `T` new tokens themselves (S = T); with one they are the
    `S = max_len` cache slots. Query `t` sits at slot `index + t` and sees slot `s` when
    `s <= index + t` and slot `s` holds a real token.
    """
    mask = attention_mask.astype(bool)  # [B, T]
    num_new = mask.shape[1]
    if cache is None:
        index, kv_mask, past = 0, mask, None
    else:
        index = cache.index
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))  # [B, S]
        past = jnp.sum(cache.mask, axis=-1)  # [B]
    if positions is None:
        positions = positions_from_mask(mask, past)
    query_slots = index + jnp.arange(num_new)  # [T]
    key_slots = jnp.arange(kv_mask.shape[1])  # [S]
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    allowed = causal[None, :, :] & kv_mask[:, None, :]  # [B, T, S]
    return AttentionContext(allowed, positions, kv_mask, index)


def window_mask(ctx: AttentionContext, window: int) -> jax.Array:
    """`[T, S]` bool: key slot `s` is one of the last `window` slots up to query `t`'s own.

    HF's `sliding_window_overlay` (`kv_idx > q_idx - window`) on cache slots, which count
    padding as HF's cache positions do; combine it with `ctx.allowed` (causal and not padding).
    """
    num_new, num_slots = ctx.allowed.shape[1], ctx.allowed.shape[2]
    query_slots = ctx.index + jnp.arange(num_new)  # [T]
    key_slots = jnp.arange(num_slots)  # [S]
    return key_slots[None, :] > query_slots[:, None] - window


def write_layer(
    layer_cache: tuple[jax.Array, jax.Array], keys: jax.Array, values: jax.Array, index
) -> tuple[jax.Array, jax.Array]:
    """Writes `[B, T, K, D]` keys/values into `[B, S, K, D]` cache arrays at slot `index`."""
    cache_keys, cache_values = layer_cache
    start = (0, index, 0, 0)
    return (
        jax.lax.dynamic_update_slice(cache_keys, keys.astype(cache_keys.dtype), start),
        jax.lax.dynamic_update_slice(cache_values, values.astype(cache_values.dtype), start),
    )
