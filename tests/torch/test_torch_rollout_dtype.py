"""`ppo.rollout_dtype` on the torch backend: the bf16 rollout copy of the actor
(`torch_rlhf.rollout_weights.RolloutModule`), re-cast only when marked stale."""

import numpy as np
import pytest
import torch
import transformers

import shared
from shared.config import ConfigError, config_from_dict
from tests.torch.tiny_hf import FAMILIES, left_padded_prompts
from torch_rlhf.generation import generate
from torch_rlhf.models import causal_lm_logits
from torch_rlhf.rollout_weights import RolloutModule

BF16_GAP_BOUND = 0.25
"""Nats; parity_tests.tolerances `bf16_rollout_logprobs` gives the measured values (<= 0.073)."""


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**FAMILIES["llama_gqa_untied"])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("value", ["bf16", "float16", 16])
def test_config_refuses_other_rollout_dtypes(value):
    with pytest.raises(ConfigError, match="ppo.rollout_dtype"):
        config_from_dict({"ppo": {"rollout_dtype": value}})


def test_config_default_is_the_training_dtype():
    assert config_from_dict({}).ppo.rollout_dtype is None
    assert config_from_dict({"ppo": {"rollout_dtype": "bfloat16"}}).ppo.rollout_dtype == "bfloat16"


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_default_and_float32_generate_on_the_actor_itself(llama, dtype):
    assert RolloutModule(dtype).get(llama) is llama


def test_bf16_copy_refreshes_only_when_stale(llama):
    rollout = RolloutModule("bfloat16")
    copy = rollout.get(llama)
    assert copy is not llama and next(copy.parameters()).dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in copy.buffers() if b.is_floating_point())
    weight = dict(llama.named_parameters())["lm_head.weight"]
    with torch.no_grad():
        weight.mul_(2)
    try:
        stale_copy = dict(rollout.get(llama).named_parameters())["lm_head.weight"]
        assert not torch.equal(stale_copy, weight.to(torch.bfloat16))  # not marked: kept
        rollout.mark_stale()
        fresh = dict(rollout.get(llama).named_parameters())["lm_head.weight"]
        assert rollout.get(llama) is copy and torch.equal(fresh, weight.to(torch.bfloat16))
    finally:
        with torch.no_grad():
            weight.div_(2)


def test_bf16_rollout_logprobs_are_fp32_and_near_the_fp32_forward(llama):
    ids, mask = (a.long() for a in left_padded_prompts(seed=1))
    steps = 12
    u = shared.sampling_uniforms(0, 1, 0, shape=(ids.shape[0], steps))
    out = generate(RolloutModule("bfloat16").get(llama), ids, mask, max_new_tokens=steps,
                   eos_token_id=None, pad_token_id=0, uniforms=u, do_sample=True)
    assert out.logprobs.dtype == torch.float32
    seq = torch.cat([ids, out.response], 1)
    with torch.no_grad():
        logits = causal_lm_logits(llama, seq, torch.cat([mask, out.response_mask.long()], 1),
                                  positions=slice(ids.shape[1] - 1, -1)).float()
    fp32 = shared.token_logprobs(logits, out.response)
    gap = (out.logprobs - fp32).abs()[out.response_mask.bool()].max().item()
    assert 1e-4 < gap < BF16_GAP_BOUND, gap  # non-zero: bf16 really ran
    assert np.isfinite(out.logprobs.numpy()).all()
