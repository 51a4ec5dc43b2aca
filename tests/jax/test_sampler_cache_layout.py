"""The KV cache is heads-major, `[B, kv_heads, max_len, head_dim]`, so a decode step's attention
reads it without relaying it out (bench.sampler_experiments measured the relayout)."""

import re

import jax
import jax.numpy as jnp
import numpy as np


def test_cache_is_heads_major_and_a_step_writes_one_slot(ours, token_ids, apply):
    model = ours("llama_gqa")
    cfg = model.config
    prompt_len, max_len = 5, 9
    cache = model.init_cache(2, max_len)
    assert cache.keys[0].shape == (2, cfg.num_kv_heads, max_len, cfg.head_dim)
    ids = jnp.asarray(token_ids(2, prompt_len + 1, seed=7))
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1] * prompt_len])
    _, cache = apply(model, ids[:, :prompt_len], mask, cache=cache)
    for layer in (*cache.keys, *cache.values):
        layer = np.asarray(layer)
        assert np.all(np.abs(layer[:, :, :prompt_len]).sum(-1) > 0)  # every row, head, slot
        assert not layer[:, :, prompt_len:].any()
    before = [np.asarray(x) for x in (*cache.keys, *cache.values)]
    _, cache = apply(model, ids[:, prompt_len:], jnp.ones((2, 1), jnp.int32), cache=cache)
    for old, new in zip(before, (*cache.keys, *cache.values), strict=True):
        new = np.asarray(new)
        np.testing.assert_array_equal(new[:, :, :prompt_len], old[:, :, :prompt_len])
        assert np.all(np.abs(new[:, :, prompt_len]).sum(-1) > 0)
        assert not new[:, :, prompt_len + 1 :].any()


def test_decode_step_does_not_relayout_the_cache(ours):
    """No top-level op of the optimized decode step writes a whole layer's cache transposed
    (the `[B, S, K, D]` layout cost two such copies per layer per step)."""
    from jax_rlhf.params import ModelDef

    mdef, params, frozen = ModelDef.split(ours("llama_gqa"))
    batch, max_len = 4, 16

    def step(params, frozen, token, cache):
        logits, cache = mdef.merge(params, frozen)(
            token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        return logits, cache

    cache = mdef.merge(params, frozen).init_cache(batch, max_len)
    token = jnp.ones((batch,), jnp.int32)
    hlo = jax.jit(step).lower(params, frozen, token, cache).compile().as_text()
    elems = cache.keys[0].size
    relayouts = []
    for line in hlo.splitlines():
        m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = [a-z0-9]+\[([\d,]+)\]", line)
        size = np.prod([int(d) for d in m.group(2).split(",")]) if m else 0
        if m and "transpose" in m.group(1) and size == elems:
            relayouts.append(line.strip()[:120])
    assert relayouts == []
