"""HF -> ours -> HF round trips and the converter's error reporting."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from jax_rlhf.models import (
    CausalLM,
    CheckpointMismatchError,
    ModelConfig,
    from_state_dict,
    load_causal_lm,
    read_hf_state_dict,
    save_hf,
    to_state_dict,
)


def _hf_state_dict(ckpt) -> dict[str, np.ndarray]:
    return read_hf_state_dict(ckpt.path)


def _from(ckpt, state_dict, **kwargs):
    cfg = ModelConfig.from_hf(ckpt.model.config)
    return from_state_dict(CausalLM, cfg, state_dict, **kwargs)


def test_round_trip_hf_ours_hf(variant, hf_checkpoint, ours, tmp_path, token_ids):
    ckpt = hf_checkpoint(variant)
    save_hf(ours(variant), tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(ckpt.model)
    original = ckpt.model.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    ids = torch.from_numpy(token_ids(2, 8)).long()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, ckpt.model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_state_dict_round_trip_is_exact(family_variant, hf_checkpoint, ours):
    original = _hf_state_dict(hf_checkpoint(family_variant))
    exported = to_state_dict(ours(family_variant))
    assert exported.keys() <= original.keys()
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_missing_keys_are_listed(hf_checkpoint):
    ckpt = hf_checkpoint("llama_gqa")
    state_dict = _hf_state_dict(ckpt)
    del state_dict["model.layers.1.mlp.up_proj.weight"], state_dict["lm_head.weight"]
    with pytest.raises(CheckpointMismatchError, match="missing HF keys \\(2\\)") as err:
        _from(ckpt, state_dict)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "'lm_head.weight'" in str(err.value)  # untied: the head is required


def test_unused_keys_are_listed(hf_checkpoint):
    ckpt = hf_checkpoint("llama_gqa")
    state_dict = _hf_state_dict(ckpt)
    state_dict["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)  # no bias here
    state_dict["model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError, match="unused HF keys \\(2\\)") as err:
        _from(ckpt, state_dict)
    assert "model.layers.0.self_attn.q_proj.bias" in str(err.value)
    assert "model.extra.weight" in str(err.value)


def test_shape_mismatch_is_listed(hf_checkpoint):
    ckpt = hf_checkpoint("gpt2")
    state_dict = _hf_state_dict(ckpt)
    state_dict["transformer.h.0.mlp.c_fc.weight"] = np.zeros((128, 32), np.float32)  # transposed
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as err:
        _from(ckpt, state_dict)
    assert "(128, 32) != (32, 128)" in str(err.value)


def test_tied_lm_head_in_checkpoint_is_dropped(hf_checkpoint, ours, token_ids, apply):
    ckpt = hf_checkpoint("llama_tied")
    state_dict = _hf_state_dict(ckpt)
    state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    model = _from(ckpt, state_dict)
    assert model.lm_head is None
    ids, mask = jnp.asarray(token_ids(2, 8)), jnp.ones((2, 8), jnp.int32)
    np.testing.assert_array_equal(
        apply(model, ids, mask)[0], apply(ours("llama_tied"), ids, mask)[0]
    )


def test_base_model_keys_and_old_buffers_are_accepted(hf_checkpoint, ours, token_ids, apply):
    """GPT-2 as published: `GPT2Model` names ("h.0..."), causal-mask buffers, no lm_head."""
    ckpt = hf_checkpoint("gpt2")
    state_dict = {key: value.numpy() for key, value in ckpt.model.transformer.state_dict().items()}
    state_dict["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    state_dict["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    model = _from(ckpt, state_dict)
    ids, mask = jnp.asarray(token_ids(2, 8)), jnp.ones((2, 8), jnp.int32)
    np.testing.assert_array_equal(apply(model, ids, mask)[0], apply(ours("gpt2"), ids, mask)[0])


def test_pytorch_bin_and_bf16_checkpoints(hf_checkpoint, tmp_path):
    """`pytorch_model.bin` is read too; bf16 weights go through float32 exactly."""
    ckpt = hf_checkpoint("opt_350m")
    ckpt.model.config.save_pretrained(tmp_path)
    bf16 = {k: v.to(torch.bfloat16) for k, v in ckpt.model.state_dict().items()}
    torch.save(bf16, tmp_path / "pytorch_model.bin")
    model = load_causal_lm(tmp_path, param_dtype="bfloat16")
    kernel = model.model.layers[1].attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    expected = bf16["model.decoder.layers.1.self_attn.q_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected)
    as_f32 = load_causal_lm(tmp_path)  # bf16 values, upcast exactly
    np.testing.assert_array_equal(as_f32.model.layers[1].attn.q_proj.kernel[...], expected)


def test_export_in_bf16(ours, tmp_path):
    save_hf(ours("gpt2"), tmp_path, dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in tensors  # tied: HF re-ties on load
    assert transformers.AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16
