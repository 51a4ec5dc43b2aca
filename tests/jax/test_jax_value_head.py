"""The value-head model against HF `*ForSequenceClassification` (the torch backend's reward model
and critic), and its checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jax_rlhf.models import (
    CheckpointMismatchError,
    ModelConfig,
    ValueHeadModel,
    from_state_dict,
    load_value_head_model,
    read_hf_state_dict,
    save_hf,
)

VALUE_TOL = 1e-4


def test_values_match_hf_score_head(
    family_variant, attention_mask, hf_checkpoint, token_ids, hf_forward, apply
):
    ckpt = hf_checkpoint(family_variant, value_head=True)
    model = load_value_head_model(ckpt.path)
    assert model.v_head.kernel[...].shape == (model.config.embed_dim, 1)  # OPT-350m: 16
    ids = token_ids(*attention_mask.shape)
    expected = hf_forward(ckpt, ids, attention_mask)  # [B, T]
    values, _ = apply(model, jnp.asarray(ids), jnp.asarray(attention_mask))
    assert values.shape == ids.shape
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(values)[real], expected[real], atol=VALUE_TOL, rtol=0)


def test_export_loads_as_hf_sequence_classifier(hf_checkpoint, tmp_path, token_ids, apply):
    ckpt = hf_checkpoint("opt_350m", value_head=True)
    model = load_value_head_model(ckpt.path)
    save_hf(model, tmp_path)
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_model.config.num_labels == 1 and tuple(hf_model.score.weight.shape) == (1, 16)
    original = ckpt.model.state_dict()
    for key, value in hf_model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
    ids, mask = jnp.asarray(token_ids(2, 8)), jnp.ones((2, 8), jnp.int32)
    reloaded = load_value_head_model(tmp_path)
    np.testing.assert_array_equal(apply(reloaded, ids, mask)[0], apply(model, ids, mask)[0])


def test_value_head_from_lm_checkpoint_needs_init_v_head(hf_checkpoint):
    """The reward model starts from the SFT model: no value head, an LM head to drop."""
    path = hf_checkpoint("llama_gqa").path
    with pytest.raises(CheckpointMismatchError, match="score.weight"):
        load_value_head_model(path)
    model = load_value_head_model(path, init_v_head=True, seed=1)
    kernel = np.asarray(model.v_head.kernel[...])
    assert kernel.shape == (32, 1) and 0 < np.abs(kernel).max() <= 1 / np.sqrt(32)


def test_deepspeed_chat_reward_checkpoint(hf_checkpoint, token_ids, apply):
    """DeepSpeed-Chat's `RewardModel` state dict: `rwtranrsformer.<AutoModel keys>` and
    `v_head.weight`."""
    ckpt = hf_checkpoint("opt", value_head=True)
    cfg = ModelConfig.from_hf(ckpt.model.config)
    backbone = ckpt.model.base_model.state_dict()  # OPTModel names: "decoder.layers.0..."
    wrapped = {f"rwtranrsformer.{k}": v.numpy() for k, v in backbone.items()}
    wrapped["v_head.weight"] = ckpt.model.score.weight.detach().numpy()
    model = from_state_dict(ValueHeadModel, cfg, wrapped, strip_prefix="rwtranrsformer.")
    reference = from_state_dict(ValueHeadModel, cfg, read_hf_state_dict(ckpt.path))
    ids, mask = jnp.asarray(token_ids(2, 8)), jnp.ones((2, 8), jnp.int32)
    np.testing.assert_array_equal(apply(model, ids, mask)[0], apply(reference, ids, mask)[0])
