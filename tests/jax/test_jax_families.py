"""Llama 3 / linear RoPE, Mistral, Qwen2 with a sliding window, Qwen3 and Phi-3 against HF torch.

Each tiny random checkpoint (built here, no network) is checked for: logits with left padding
(fp32), the config and state-dict round trip through `save_hf` (bit-exact, and the export loads
in the same `AutoModelForCausalLM` class), greedy tokens through our sampler and KV cache equal
to HF `generate` for more tokens than the sliding windows hold, per-token values of the
value-head model against HF's `*ForSequenceClassification`, and the options the readers refuse.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_families import (
    assert_block_matches_hf,
    checkpoint_builder,
    forward,
    hf_outputs,
    max_diff,
    token_ids,
)

from jax_rlhf.models import (
    ModelConfig,
    load_causal_lm,
    load_value_head_model,
    read_hf_state_dict,
    save_hf,
)
from jax_rlhf.params import ModelDef
from jax_rlhf.sampler import SamplingParams, generate

VOCAB = 128
LOGITS_TOL = 1e-5
_LLAMA = dict(
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_WINDOW = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)
_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.5, 2.0, 3.0],
    "long_factor": [2.0, 4.0, 8.0, 16.0],
}

HF_CONFIGS = {
    # inv_freq 1, 0.1, 0.01, 0.001: wavelengths below, inside and above the llama3 band
    "llama3": lambda: transformers.LlamaConfig(
        **_LLAMA,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_linear_tied_bias": lambda: transformers.LlamaConfig(
        **_LLAMA,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA, sliding_window=None),
    "mistral_window": lambda: transformers.MistralConfig(**_LLAMA, sliding_window=4),
    # layer 0 global, layer 1 windowed (HF's max_window_layers)
    "qwen2_window": lambda: transformers.Qwen2Config(**_LLAMA, **_WINDOW),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA, head_dim=16, tie_word_embeddings=True),
    "qwen3_window_bias": lambda: transformers.Qwen3Config(
        **_LLAMA, head_dim=16, attention_bias=True, **_WINDOW
    ),
    "phi3_partial_rotary": lambda: transformers.Phi3Config(**_LLAMA, partial_rotary_factor=0.5),
    # long factors from position 8 on; attention factor sqrt(1 + ln 8 / ln 8)
    "phi3_longrope_window": lambda: transformers.Phi3Config(
        **_LLAMA, sliding_window=5, original_max_position_embeddings=8, rope_parameters=_LONGROPE
    ),
}
NO_GENERATE = ("phi3_longrope_window",)  # refused beyond original_max_position_embeddings
LEFT_PADDED = np.array([[1] * 9, [0] * 3 + [1] * 6, [0] * 7 + [1] * 2])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(name, value_head=False) -> (HF model, directory)`, built once per module."""
    return checkpoint_builder(HF_CONFIGS, tmp_path_factory)


def _ids(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    return token_ids(mask, VOCAB, seed)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_hf_with_left_padding(name, checkpoint):
    """9 slots (Phi-3 longrope: long factors) and their last 6 (short factors)."""
    hf_model, path = checkpoint(name)
    model = load_causal_lm(path)
    for mask in (LEFT_PADDED, LEFT_PADDED[:, 3:]):
        ids = _ids(mask)
        logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
        assert max_diff(logits, hf_outputs(hf_model, ids, mask), mask) < LOGITS_TOL


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_round_trip_is_bit_exact(name, checkpoint, tmp_path):
    """HF -> ours -> `save_hf` -> HF: the same config, tensors and logits, the same class."""
    hf_model, path = checkpoint(name)
    model = load_causal_lm(path)
    assert ModelConfig.from_hf(model.config.to_hf()) == model.config
    save_hf(model, tmp_path)
    original, exported = read_hf_state_dict(path), read_hf_state_dict(tmp_path)
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


def _sample_greedy(path, ids, mask, steps):
    mdef, params, frozen = ModelDef.split(load_causal_lm(path))
    sp = SamplingParams(max_new_tokens=steps, eos_ids=(VOCAB + 1,), pad_id=0, do_sample=False)
    out = generate(mdef, params, frozen, ids, mask, np.zeros((len(ids), steps), np.float32), sp)
    return np.asarray(out.tokens)


@pytest.mark.parametrize("name", [n for n in HF_CONFIGS if n not in NO_GENERATE])
def test_greedy_tokens_equal_hf_generate(name, checkpoint):
    """Prompts of 6 slots plus 8 new tokens: 14 > the windows of 4, so windowed layers drop
    keys from the cache as HF's sliding-window mask does."""
    hf_model, path = checkpoint(name)
    steps, mask = 8, np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 4 + [1] * 2], np.int32)
    ids = _ids(mask, seed=3).astype(np.int32)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=VOCAB + 1,  # none: min_new_tokens would suppress token 2 instead
            pad_token_id=0,
        )
    expected = out[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(_sample_greedy(path, ids, mask, steps), expected)


def test_longrope_generation_past_the_original_context_is_refused(checkpoint):
    _, path = checkpoint("phi3_longrope_window")
    mask = np.ones((1, 6), np.int32)
    np.testing.assert_array_equal(_sample_greedy(path, _ids(mask), mask, 2).shape, (1, 2))
    with pytest.raises(ValueError, match="original_max_position_embeddings=8"):
        _sample_greedy(path, _ids(mask), mask, 3)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_values_match_hf_sequence_classifier(name, checkpoint, tmp_path):
    hf_model, path = checkpoint(name, value_head=True)
    model = load_value_head_model(path)
    ids = _ids(LEFT_PADDED)
    values = forward(model, jnp.asarray(ids), jnp.asarray(LEFT_PADDED))
    expected = hf_outputs(hf_model, ids, LEFT_PADDED)  # [B, T]
    assert max_diff(values, expected, LEFT_PADDED) < LOGITS_TOL
    save_hf(model, tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(reloaded) is type(hf_model)


REFUSED = {
    "llama dynamic rope": (
        lambda: transformers.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "rope_type='dynamic'",
    ),
    "mistral yarn": (
        lambda: transformers.MistralConfig(
            rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}
        ),
        "rope_type='yarn'",
    ),
    "llama partial rotary": (
        lambda: transformers.LlamaConfig(
            rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}
        ),
        "partial_rotary_factor",
    ),
    "llama pretraining_tp": (lambda: transformers.LlamaConfig(pretraining_tp=2), "pretraining_tp"),
    "qwen3 longrope": (
        lambda: transformers.Qwen3Config(
            rope_scaling={**_LONGROPE, "original_max_position_embeddings": 8}
        ),
        "rope_type='longrope'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_options_are_refused_by_name(case):
    make, option = REFUSED[case]
    with pytest.raises(ValueError, match="not supported") as err:
        ModelConfig.from_hf(make())
    assert option in str(err.value) and "--backend torch" in str(err.value)


def test_qwen2_without_windowed_layers_reads_as_global():
    """`use_sliding_window` with `max_window_layers` >= layers windows nothing (HF's
    `layer_types`): read as global attention, written back as such."""
    hf_config = transformers.Qwen2Config(**{**_LLAMA, **_WINDOW, "max_window_layers": 2})
    cfg = ModelConfig.from_hf(hf_config)
    assert (cfg.sliding_window, cfg.layer_types) == (None, None)
    assert not cfg.to_hf().use_sliding_window


@pytest.mark.parametrize("name", ["llama3", "llama_linear_tied_bias", "phi3_longrope_window"])
def test_rope_inverse_frequencies_match_hf(name):
    """`rope_inv_freq` against HF's `ROPE_INIT_FUNCTIONS` (longrope: short and long sets)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jax_rlhf.models.layers import rope_inv_freq

    hf_config = HF_CONFIGS[name]()
    cfg = ModelConfig.from_hf(hf_config)
    kwargs = dict(
        rotary_dim=cfg.head_dim,
        theta=cfg.rope_theta,
        rope_type=cfg.rope_type,
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )
    init = ROPE_INIT_FUNCTIONS[cfg.rope_type]
    if cfg.rope_type != "longrope":
        expected, _ = init(hf_config)
        np.testing.assert_array_equal(rope_inv_freq(**kwargs), expected.numpy())
        return
    for seq_len, factors in ((None, cfg.rope_short_factor), (9, cfg.rope_long_factor)):
        expected, attention = init(hf_config, seq_len=seq_len)
        got = rope_inv_freq(**kwargs, ext_factors=factors)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-7, atol=0)
        assert attention == cfg.rope_attention_factor


BLOCKS = {  # variant -> layers to check (a windowed and a full one where both occur)
    "llama3": (0,),
    "llama_linear_tied_bias": (0,),
    "mistral_window": (0,),
    "qwen2_window": (0, 1),
    "qwen3_window_bias": (0, 1),
    "phi3_partial_rotary": (0,),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_hf_decoder_layer(name, checkpoint):
    """One decoder block against HF's layer on the same inputs, 10 tokens (> the window of 4):
    RoPE scaling, windows, q/k norms, biases and partial rotary each inside one block."""
    hf_model, path = checkpoint(name)
    assert_block_matches_hf(hf_model, load_causal_lm(path), BLOCKS[name])


def test_lora_refuses_phi3_fused_layers_and_adapts_the_others(checkpoint):
    """peft puts one adapter on Phi-3's fused qkv_proj / gate_up_proj; separate adapters on
    our split kernels would train differently, so selecting them is an error naming the layer,
    and the unfused layers adapt as on any Llama."""
    from flax import nnx

    from jax_rlhf.models.lora import apply_lora

    _, path = checkpoint("phi3_partial_rotary")
    with pytest.raises(ValueError, match=r"LoRA on model\.layers\.0\.\S+_proj .*--backend torch"):
        apply_lora(load_causal_lm(path), rank=2, alpha=2.0, module_name="layers.",
                   rngs=nnx.Rngs(0))
    targets = apply_lora(load_causal_lm(path), rank=2, alpha=2.0, module_name="",
                         target_modules=("o_proj", "down_proj"), rngs=nnx.Rngs(0))
    assert targets == [f"model.layers.{i}.{m}" for i in range(2)
                       for m in ("attn.o_proj", "mlp.down_proj")]
