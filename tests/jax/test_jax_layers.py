"""Bottom-up parity with the HF torch modules (levanter's order): norm, RoPE, attention, block.

Our layers are taken from the converted model, so these tests also pin down the key map of each
layer before the whole-model tests in test_models.py.
"""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from jax_rlhf.models.kv_cache import attention_context
from jax_rlhf.models.layers import apply_rope, rope_cos_sin

NORM_TOL = 1e-6  # levanter's tolerance for one norm layer
LAYER_TOL = 1e-4  # ... and for attention and a whole block


def _inputs(batch=2, length=6, width=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (batch, length, width)).astype(np.float32)


def _hf_layer(ckpt):
    """(decoder layer, its attention) of HF layer 0."""
    if ckpt.family == "llama":
        layer = ckpt.model.model.layers[0]
        return layer, layer.self_attn
    if ckpt.family == "opt":
        layer = ckpt.model.model.decoder.layers[0]
        return layer, layer.self_attn
    layer = ckpt.model.transformer.h[0]
    return layer, layer.attn


def _hf_kwargs(ckpt, x: torch.Tensor) -> dict:
    """An additive causal mask `[1, 1, T, T]` and, for Llama, the RoPE tables."""
    length = x.shape[1]
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    kwargs = {"attention_mask": mask}
    if ckpt.family == "llama":
        positions = torch.arange(length)[None].expand(x.shape[0], -1)
        kwargs["position_embeddings"] = ckpt.model.model.rotary_emb(x, positions)
    return kwargs


def _causal_context(x: np.ndarray):
    return attention_context(jnp.ones(x.shape[:2], jnp.int32), None)


def test_rms_norm_matches_hf(hf_checkpoint, ours):
    hf_norm = hf_checkpoint("llama_gqa").model.model.layers[0].input_layernorm
    x = _inputs() * 3.0
    with torch.no_grad():
        expected = hf_norm(torch.from_numpy(x)).numpy()
    got = ours("llama_gqa").model.layers[0].attn_norm(jnp.asarray(x))
    np.testing.assert_allclose(got, expected, atol=NORM_TOL, rtol=0)


def test_layer_norm_matches_torch(hf_checkpoint, ours):
    hf_norm = hf_checkpoint("opt").model.model.decoder.layers[0].self_attn_layer_norm
    x = _inputs() * 3.0 + 1.0
    with torch.no_grad():
        expected = hf_norm(torch.from_numpy(x)).numpy()
    got = ours("opt").model.layers[0].attn_norm(jnp.asarray(x))
    np.testing.assert_allclose(got, expected, atol=NORM_TOL, rtol=0)


def test_rope_matches_hf(hf_checkpoint):
    hf_model = hf_checkpoint("llama_bias").model  # rope_theta=500
    positions = np.array([[0, 0, 0, 1, 2, 3], [5, 17, 31, 47, 60, 63]])
    q = np.random.default_rng(1).normal(size=(2, 4, 6, 8)).astype(np.float32)  # [B, N, T, D]
    with torch.no_grad():
        cos, sin = hf_model.model.rotary_emb(torch.from_numpy(q), torch.from_numpy(positions))
        expected, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    our_cos, our_sin = rope_cos_sin(
        jnp.asarray(positions), head_dim=8, theta=500.0, dtype=jnp.float32
    )
    np.testing.assert_allclose(our_cos, cos.numpy(), atol=NORM_TOL, rtol=0)
    np.testing.assert_allclose(our_sin, sin.numpy(), atol=NORM_TOL, rtol=0)
    got = apply_rope(jnp.asarray(q), our_cos[:, None], our_sin[:, None])
    np.testing.assert_allclose(got, expected.numpy(), atol=NORM_TOL, rtol=0)


def test_attention_matches_hf(variant, hf_checkpoint, ours, apply):
    ckpt = hf_checkpoint(variant)
    _, hf_attn = _hf_layer(ckpt)
    x = _inputs()
    x_t = torch.from_numpy(x)
    with torch.no_grad():
        expected = hf_attn(hidden_states=x_t, **_hf_kwargs(ckpt, x_t))[0].numpy()
    got, _ = apply(ours(variant).model.layers[0].attn, jnp.asarray(x), _causal_context(x))
    np.testing.assert_allclose(got, expected, atol=LAYER_TOL, rtol=0)


def test_block_matches_hf(variant, hf_checkpoint, ours, apply):
    ckpt = hf_checkpoint(variant)
    hf_block, _ = _hf_layer(ckpt)
    x = _inputs()
    x_t = torch.from_numpy(x)
    with torch.no_grad():
        expected = hf_block(x_t, **_hf_kwargs(ckpt, x_t))
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    got, _ = apply(ours(variant).model.layers[0], jnp.asarray(x), _causal_context(x))
    np.testing.assert_allclose(got, expected, atol=LAYER_TOL, rtol=0)
