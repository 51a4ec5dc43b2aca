"""GPT-NeoX (Pythia), Gemma, Gemma 2 and Gemma 3 (text) against HF torch, fp32.

Each tiny random checkpoint (built here, no network; norms redrawn around HF's identity so a
wrong `1 + weight` or transpose shows far above the tolerances) is checked for: logits with
left padding, the export loading back in `AutoModelForCausalLM` bit-exactly, greedy tokens
through our sampler and KV cache equal to HF `generate` for more tokens than the sliding
window holds, per-token values of the value-head model against HF's
`*ForSequenceClassification`, and the options the readers refuse.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_families import assert_block_matches_hf, checkpoint_builder, forward, hf_outputs, token_ids

from jax_rlhf.models import (
    ModelConfig,
    load_causal_lm,
    load_value_head_model,
    read_hf_state_dict,
    save_hf,
)
from jax_rlhf.models.gemma import GemmaRMSNorm, scaled_embedding
from jax_rlhf.models.layers import embedding
from jax_rlhf.params import ModelDef
from jax_rlhf.sampler import SamplingParams, generate

VOCAB = 128
LOGITS_TOL = 1e-5
"""Measured over 3 draws of ids: logits 1.5e-6 (GPT-NeoX), 2.1e-6 (sequential), 2.4e-6 (Gemma),
2.9e-6 (Gemma 2), 3.0e-6 (Gemma 3); values at most 1.5e-6."""
_COMMON = dict(
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
_GEMMA = dict(
    _COMMON,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # independent of hidden_size / heads, as in Gemma 7B
)
_LOCAL = dict(sliding_window=4, query_pre_attn_scalar=12)

HF_CONFIGS = {
    # Pythia: parallel residual, rotary_pct 0.25, untied embed_out
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.25,
        rotary_emb_base=500,
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        **_COMMON,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.5,
        use_parallel_residual=False,
        attention_bias=False,
        tie_word_embeddings=True,
    ),
    "gemma": lambda: transformers.GemmaConfig(**_GEMMA, num_hidden_layers=2),
    # local, global, local; soft-capped scores and logits
    "gemma2": lambda: transformers.Gemma2Config(
        **_GEMMA,
        **_LOCAL,
        num_hidden_layers=3,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    # local, global, local, global; q/k norms, local base 100, global linear scaling 4
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_GEMMA,
        **_LOCAL,
        num_hidden_layers=4,
        sliding_window_pattern=2,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=3.0,
    ),
}
VALUE_HEAD_VARIANTS = ("gpt_neox", "gemma", "gemma2", "gemma3")
LEFT_PADDED = np.array([[1] * 9, [0] * 3 + [1] * 6, [0] * 7 + [1] * 2])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(name, value_head=False) -> (HF model, directory)`, built once per module."""
    return checkpoint_builder(HF_CONFIGS, tmp_path_factory)


def _ids(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    return token_ids(mask, VOCAB, seed)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_hf_with_left_padding(name, checkpoint):
    hf_model, path = checkpoint(name)
    ids = _ids(LEFT_PADDED)
    expected = hf_outputs(hf_model, ids, LEFT_PADDED)
    logits = forward(load_causal_lm(path), jnp.asarray(ids), jnp.asarray(LEFT_PADDED))
    real = LEFT_PADDED.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_round_trip_is_bit_exact(name, checkpoint, tmp_path):
    """HF -> ours -> `save_hf` -> `AutoModelForCausalLM`: the same tensors and the same logits."""
    hf_model, path = checkpoint(name)
    save_hf(load_causal_lm(path), tmp_path)
    original, exported = read_hf_state_dict(path), read_hf_state_dict(tmp_path)
    if "embed_out.weight" in original:  # HF saves GPT-NeoX's head under its legacy name
        original["lm_head.weight"] = original.pop("embed_out.weight")
    if hf_model.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(hf_model)
    ids = _ids(LEFT_PADDED)
    np.testing.assert_array_equal(
        hf_outputs(reloaded, ids, LEFT_PADDED), hf_outputs(hf_model, ids, LEFT_PADDED)
    )


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_tokens_equal_hf_generate(name, checkpoint):
    """Prompts of 6 slots plus 8 new tokens: 14 > the window of 4, so local layers drop keys
    from the cache as HF's sliding-window cache does."""
    hf_model, path = checkpoint(name)
    steps, mask = 8, np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 4 + [1] * 2], np.int32)
    ids = _ids(mask, seed=3).astype(np.int32)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=0,
        )
    expected = out[:, ids.shape[1] :].numpy()
    mdef, params, frozen = ModelDef.split(load_causal_lm(path))
    sp = SamplingParams(max_new_tokens=steps, eos_ids=(VOCAB + 1,), pad_id=0, do_sample=False)
    ours = generate(mdef, params, frozen, ids, mask, np.zeros((3, steps), np.float32), sp)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)


@pytest.mark.parametrize("name", VALUE_HEAD_VARIANTS)
def test_values_match_hf_sequence_classifier(name, checkpoint, tmp_path):
    hf_model, path = checkpoint(name, value_head=True)
    model = load_value_head_model(path)
    ids = _ids(LEFT_PADDED)
    expected = hf_outputs(hf_model, ids, LEFT_PADDED)  # [B, T]
    values = forward(model, jnp.asarray(ids), jnp.asarray(LEFT_PADDED))
    real = LEFT_PADDED.astype(bool)
    np.testing.assert_allclose(np.asarray(values)[real], expected[real], atol=LOGITS_TOL, rtol=0)
    save_hf(model, tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(reloaded) is type(hf_model)


def test_gpt_neox_head_loads_under_either_name(checkpoint):
    """transformers saves GPT-NeoX's LM head as `embed_out` (Pythia's name on the Hub) and
    renames it `lm_head` on load; we accept both spellings and export `lm_head`."""
    from jax_rlhf.models import CausalLM, from_state_dict

    _, path = checkpoint("gpt_neox")
    state_dict = read_hf_state_dict(path)
    head = state_dict["embed_out.weight"]
    cfg = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path))
    for name in ("embed_out.weight", "lm_head.weight"):
        renamed = {(name if k == "embed_out.weight" else k): v for k, v in state_dict.items()}
        model = from_state_dict(CausalLM, cfg, renamed)
        np.testing.assert_array_equal(model.lm_head.kernel[...].T, head)


REFUSED = {
    "gpt_neox rope scaling": (
        lambda: transformers.GPTNeoXConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "rope_type='linear'",
    ),
    "gpt_neox odd rotary width": (
        lambda: transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.2),
        "rotary",
    ),
    "gemma bidirectional": (
        lambda: transformers.GemmaConfig(use_bidirectional_attention=True),
        "use_bidirectional_attention",
    ),
    "gemma2 rope scaling": (
        lambda: transformers.Gemma2Config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "rope_type='dynamic'",
    ),
    "gemma3 attention soft-capping": (
        lambda: transformers.Gemma3TextConfig(attn_logit_softcapping=50.0),
        "attn_logit_softcapping",
    ),
    "gemma3 yarn": (
        lambda: transformers.Gemma3TextConfig(
            rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}
        ),
        "rope_type='yarn'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_options_are_refused_by_name(case):
    make, option = REFUSED[case]
    with pytest.raises(ValueError, match="not supported") as err:
        ModelConfig.from_hf(make())
    assert option in str(err.value) and "--backend torch" in str(err.value)


def test_gemma_embedding_scale_is_rounded_to_the_parameter_dtype():
    """HF multiplies by sqrt(hidden) cast to the weights' dtype: 55.5, not 55.43, in bf16."""
    cfg = ModelConfig.from_hf(
        transformers.GemmaConfig(hidden_size=3072, vocab_size=4, num_hidden_layers=1),
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    table = embedding(cfg, 4, 3072, rngs=nnx.Rngs(0))
    table.embedding[...] = jnp.ones((4, 3072), jnp.bfloat16)
    x = scaled_embedding(cfg, table, jnp.asarray([[3]]))
    assert x.dtype == jnp.bfloat16 and float(x[0, 0, 0]) == 55.5


def test_gemma_rms_norm_scales_by_one_plus_weight():
    cfg = ModelConfig.from_hf(transformers.GemmaConfig(hidden_size=4, num_hidden_layers=1))
    norm = GemmaRMSNorm(cfg, 4)
    norm.scale[...] = jnp.asarray([0.0, 1.0, -1.0, 0.5])
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    rms = np.sqrt(np.mean(np.square([1.0, 2.0, 3.0, 4.0])) + cfg.norm_eps)
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / rms * np.array([1.0, 2.0, 0.0, 1.5])
    np.testing.assert_allclose(norm(x)[0], expected, rtol=1e-6)


BLOCKS = {  # variant -> layers to check (Gemma 2/3: a local and a global one)
    "gpt_neox": (0,),
    "gpt_neox_sequential": (0,),
    "gemma": (0,),
    "gemma2": (0, 1),
    "gemma3": (0, 1),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_hf_decoder_layer(name, checkpoint):
    """One decoder block against HF's layer on the same inputs, 10 tokens (> the window of 4),
    HF's mask built here: causal, and within the window on local layers."""
    hf_model, path = checkpoint(name)
    assert_block_matches_hf(hf_model, load_causal_lm(path), BLOCKS[name])


def test_gpt_neox_fused_qkv_is_column_parallel():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from jax_rlhf import sharding

    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    name = "model.layers.0.attn.query_key_value"
    assert sharding.param_spec(f"{name}.kernel", (32, 96), mesh) == P("fsdp", "tensor")
    assert sharding.param_spec(f"{name}.bias", (96,), mesh) == P("tensor")
