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


def test_exported_gpt2_reward_model_scores_left_padding_with_position_ids(
    hf_checkpoint, tmp_path, token_ids, apply
):
    """docs/architecture.md (GPT-2 and left padding), the model card's note: HF's GPT-2
    forward without `position_ids` counts positions from the first column, padding included;
    with `position_ids = cumsum(mask) - 1` an exported reward model scores a left-padded batch
    as the backend did."""
    import torch

    model = load_value_head_model(hf_checkpoint("gpt2", value_head=True).path)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    mask = np.array([[1] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2])  # left padding
    ids = token_ids(*mask.shape)
    values, _ = apply(model, jnp.asarray(ids), jnp.asarray(mask))
    backend_scores = np.asarray(values)[:, -1]  # the last real token of every row

    def hf_scores(**position) -> np.ndarray:
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        with torch.no_grad():
            hidden = hf.base_model(input_ids=ids_t, attention_mask=mask_t, **position)
            return hf.score(hidden.last_hidden_state)[:, -1, 0].numpy()

    position_ids = (torch.from_numpy(mask).cumsum(-1) - 1).clamp(min=0)
    np.testing.assert_allclose(hf_scores(position_ids=position_ids), backend_scores,
                               atol=VALUE_TOL, rtol=0)
    plain = hf_scores()
    assert plain[0] == pytest.approx(backend_scores[0], abs=VALUE_TOL)  # no padding: same
    assert np.abs(plain[1:] - backend_scores[1:]).min() > 100 * VALUE_TOL  # padded: not
