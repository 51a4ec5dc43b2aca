"""Whole-model logits against HF torch (fp32), with right and left padding."""

import copy

import jax.numpy as jnp
import numpy as np
import torch

from jax_rlhf.models import load_causal_lm

LOGITS_TOL = 1e-4


def test_logits_match_hf(
    variant, attention_mask, hf_checkpoint, ours, token_ids, hf_forward, apply
):
    ids = token_ids(*attention_mask.shape)
    expected = hf_forward(hf_checkpoint(variant), ids, attention_mask)
    logits, cache = apply(ours(variant), jnp.asarray(ids), jnp.asarray(attention_mask))
    assert cache is None
    assert logits.shape == (*ids.shape, 100) and logits.dtype == jnp.float32
    real = attention_mask.astype(bool)  # padding positions carry no meaning in either model
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=LOGITS_TOL, rtol=0)


def test_left_padding_does_not_change_logits(family_variant, ours, token_ids, apply):
    """A left-padded row reproduces the same tokens unpadded: positions come from the mask."""
    model = ours(family_variant)
    ids = token_ids(1, 8)
    padded_ids = np.concatenate([np.zeros((1, 3), int), ids[:, :5]], axis=1)
    both = jnp.asarray(np.concatenate([ids, padded_ids]))
    mask = jnp.asarray([[1] * 8, [0] * 3 + [1] * 5])
    logits, _ = apply(model, both, mask)  # [2, 8, V]
    np.testing.assert_allclose(logits[1, 3:], logits[0, :5], atol=1e-5, rtol=0)


def test_hidden_states_feed_the_lm_head(family_variant, ours, token_ids, apply):
    model = ours(family_variant)
    ids = jnp.asarray(token_ids(2, 8))
    mask = jnp.ones((2, 8), jnp.int32)
    hidden, _ = apply(model, ids, mask, method="hidden_states")
    assert hidden.shape == (2, 8, model.config.embed_dim)
    logits, _ = apply(model, ids, mask)
    head = model.model.embed_tokens.attend if model.lm_head is None else model.lm_head
    np.testing.assert_allclose(head(hidden), logits, atol=1e-6, rtol=0)


def test_bfloat16_error_is_no_worse_than_hf_bfloat16(hf_checkpoint, token_ids, hf_forward, apply):
    """In bf16 (statistics and softmax still f32) our mean error against the fp32 logits is
    that of the HF torch model cast to bf16 (measured 0.0157 vs 0.0158 on 8 x 16 tokens)."""
    ckpt = hf_checkpoint("llama_gqa")
    ids, mask = token_ids(2, 8), np.ones((2, 8), int)
    reference = hf_forward(ckpt, ids, mask)
    hf_bf16 = copy.deepcopy(ckpt.model).to(torch.bfloat16)
    with torch.no_grad():
        hf_logits = hf_bf16(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    model = load_causal_lm(ckpt.path, dtype="bfloat16", param_dtype="bfloat16")
    assert model.model.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    logits, _ = apply(model, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.dtype == jnp.bfloat16
    ours_error = np.abs(np.asarray(logits, np.float32) - reference).mean()
    hf_error = np.abs(hf_logits - reference).mean()
    assert ours_error <= 1.5 * hf_error, (ours_error, hf_error)


def test_logits_to_keep_equals_slicing_the_full_logits(family_variant, ours, token_ids, apply):
    """`logits_to_keep` (the sampler's prefill, PPO's answer positions) is a fast path: the
    LM head on fewer positions gives those positions' logits of the full forward."""
    model = ours(family_variant)
    ids = jnp.asarray(token_ids(2, 8))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    full, _ = apply(model, ids, mask)  # [2, 8, V]
    last, _ = model(ids, mask, logits_to_keep=1)
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5, rtol=0)
    answer, _ = model(ids, mask, logits_to_keep=slice(4, -1))
    assert answer.shape == (2, 3, full.shape[-1])
    np.testing.assert_allclose(answer, full[:, 4:-1], atol=1e-5, rtol=0)
