"""Decoding with the static KV cache reproduces the full forward, left-padded prompts included."""

import jax.numpy as jnp
import numpy as np

from jax_rlhf.models import positions_from_mask

CACHE_TOL = 1e-5


def test_positions_from_mask_are_cumsum_minus_one_clipped_at_zero():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(
        positions_from_mask(jnp.ones((2, 2), jnp.int32), jnp.asarray([3, 5])), [[3, 4], [5, 6]]
    )


def test_decode_with_cache_equals_full_forward(family_variant, ours, token_ids, apply):
    """Prefill a left-padded prompt, then feed the continuation one token at a time (jitted,
    static shapes); each step's logits equal the full forward's at the same position."""
    model = ours(family_variant)
    prompt_len, new_tokens = 6, 4
    ids = jnp.asarray(token_ids(2, prompt_len + new_tokens, seed=3))
    prompt_mask = np.array([[0, 0, 1, 1, 1, 1], [1] * prompt_len])
    full_mask = jnp.asarray(np.concatenate([prompt_mask, np.ones((2, new_tokens), int)], axis=1))
    full, _ = apply(model, ids, full_mask)  # [B, T, V]

    cache = model.init_cache(batch_size=2, max_len=prompt_len + new_tokens + 2)
    logits, cache = apply(model, ids[:, :prompt_len], jnp.asarray(prompt_mask), cache=cache)
    real = prompt_mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(logits)[real], np.asarray(full[:, :prompt_len])[real], atol=CACHE_TOL, rtol=0
    )
    for t in range(prompt_len, prompt_len + new_tokens):
        logits, cache = apply(model, ids[:, t : t + 1], jnp.ones((2, 1), jnp.int32), cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=CACHE_TOL, rtol=0)
    assert int(cache.index) == prompt_len + new_tokens
    np.testing.assert_array_equal(cache.mask[:, : prompt_len + new_tokens], full_mask)
    assert not cache.mask[:, prompt_len + new_tokens :].any()


def test_chunked_prefill_equals_one_prefill(ours, token_ids, apply):
    model = ours("llama_gqa")
    ids = jnp.asarray(token_ids(2, 6, seed=4))
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1] * 6])
    whole, _ = apply(model, ids, mask, cache=model.init_cache(2, 8))
    cache = model.init_cache(2, 8)
    first, cache = apply(model, ids[:, :3], mask[:, :3], cache=cache)
    second, cache = apply(model, ids[:, 3:], mask[:, 3:], cache=cache)
    np.testing.assert_allclose(
        jnp.concatenate([first, second], axis=1)[:, 1:], whole[:, 1:], atol=CACHE_TOL, rtol=0
    )
    assert cache.keys[0].shape == (2, 8, 2, 8)  # [B, max_len, kv_heads, head_dim]
