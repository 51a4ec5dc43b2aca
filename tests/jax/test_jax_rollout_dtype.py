"""`ppo.rollout_dtype`: the bf16 rollout copy of the actor (`jax_rlhf.rollout_weights`).

The bf16 sampler computes in bf16 (weights, matmuls, KV cache) and records float32 log-probs
that stay within a stated bound of the fp32 training forward on its own tokens; without the
option the sampler gets the actor's own arrays (the parity-tested fp32 path, unchanged)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shared
from jax_rlhf.models import load_causal_lm
from jax_rlhf.params import ModelDef
from jax_rlhf.rollout_weights import RolloutWeights
from jax_rlhf.sampler import SamplingParams, generate

PROMPT_MASK = np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], np.int32)
STEPS = 12
BF16_GAP_BOUND = 0.25
"""Nats; parity_tests.tolerances `bf16_rollout_logprobs` gives the measured values (<= 0.073)."""


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    ckpt = hf_checkpoint("llama_gqa")
    mdef, params, frozen = ModelDef.split(load_causal_lm(ckpt.path))
    ids = np.random.default_rng(3).integers(3, 100, PROMPT_MASK.shape).astype(np.int32)
    return mdef, params, frozen, np.where(PROMPT_MASK == 1, ids, 0)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_default_and_float32_pass_the_actor_weights_through(llama, dtype):
    mdef, params, frozen, _ = llama
    got_mdef, got_params, got_frozen = RolloutWeights(mdef, dtype).get(
        SimpleNamespace(params=params, frozen=frozen))
    assert got_mdef is mdef and got_params is params and got_frozen is frozen


def test_bf16_copy_is_cast_once_per_training_state(llama):
    mdef, params, frozen, _ = llama
    weights = RolloutWeights(mdef, "bfloat16")
    state = SimpleNamespace(params=params, frozen=frozen)
    bf_mdef, bf_params, _ = weights.get(state)
    assert bf_mdef.config.dtype == "bfloat16" and bf_mdef.names == mdef.names
    assert {x.dtype for x in bf_params.values()} == {jnp.dtype(jnp.bfloat16)}
    assert weights.get(state)[1] is bf_params  # the same state: no second cast
    new_state = SimpleNamespace(params=jax.tree.map(lambda x: x * 2, params), frozen=frozen)
    again = weights.get(new_state)[1]  # a training step made a new state: re-cast
    name = next(iter(again))
    np.testing.assert_array_equal(np.asarray(again[name], np.float32),
                                  np.asarray((params[name] * 2).astype(jnp.bfloat16), np.float32))


def test_bf16_sampler_runs_bf16_with_fp32_logprobs_near_the_fp32_forward(llama):
    mdef, params, frozen, ids = llama
    bf_mdef, bf_params, bf_frozen = RolloutWeights(mdef, "bfloat16").get(
        SimpleNamespace(params=params, frozen=frozen))
    assert bf_mdef.merge(bf_params, bf_frozen).init_cache(3, 8).keys[0].dtype == jnp.bfloat16
    sp = SamplingParams(max_new_tokens=STEPS, eos_ids=(7,), pad_id=0)
    u = shared.sampling_uniforms(0, 1, 0, shape=(3, STEPS))
    out = generate(bf_mdef, bf_params, bf_frozen, ids, PROMPT_MASK, u, sp)
    assert out.logprobs.dtype == jnp.float32
    # the training forward (fp32) on the bf16 sampler's tokens: rollout_logprob_gap
    seq = jnp.concatenate([ids, out.tokens], axis=1)
    mask = jnp.concatenate([PROMPT_MASK, out.response_mask], axis=1)
    logits, _ = mdef.merge(params, frozen)(seq, mask)
    fp32 = shared.token_logprobs(logits[:, ids.shape[1] - 1 : -1], out.tokens)
    real = np.asarray(out.response_mask).astype(bool)
    gap = np.abs(np.asarray(out.logprobs) - np.asarray(fp32))[real]
    assert 1e-4 < gap.max() < BF16_GAP_BOUND, gap.max()  # non-zero: bf16 really ran
    assert (np.asarray(out.logprobs)[~real] == 0).all()
