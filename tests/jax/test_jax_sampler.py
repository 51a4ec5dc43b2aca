"""The jitted sampler: greedy equals HF `generate`, recorded log-probs equal a full forward's,
uniforms decide the tokens, rows stop at their own EOS."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import shared
from jax_rlhf.models import load_causal_lm
from jax_rlhf.params import ModelDef
from jax_rlhf.sampler import SamplingParams, generate

PROMPT_MASK = np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], np.int32)
STEPS = 7


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    ckpt = hf_checkpoint("llama_gqa")
    mdef, params, frozen = ModelDef.split(load_causal_lm(ckpt.path))
    ids = np.random.default_rng(3).integers(3, 100, PROMPT_MASK.shape).astype(np.int32)
    ids = np.where(PROMPT_MASK == 1, ids, 0)
    return ckpt, mdef, params, frozen, ids


def _hf_greedy(model, ids, mask, eos):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            do_sample=False,
            max_new_tokens=STEPS,
            min_new_tokens=0,
            eos_token_id=eos,
            pad_token_id=0,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, STEPS - new.shape[1])))  # HF stops once all rows ended


def test_greedy_matches_hf_generate_with_per_row_eos(llama):
    ckpt, mdef, params, frozen, ids = llama
    free = _hf_greedy(ckpt.model, ids, PROMPT_MASK, eos=99_999)  # no EOS
    eos = int(free[0, 2])  # row 0 ends at step 2; other rows end wherever it appears, if at all
    expected = _hf_greedy(ckpt.model, ids, PROMPT_MASK, eos=eos)
    sp = SamplingParams(max_new_tokens=STEPS, eos_ids=(eos,), pad_id=0, do_sample=False)
    out = generate(mdef, params, frozen, ids, PROMPT_MASK, np.zeros((3, STEPS), np.float32), sp)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    np.testing.assert_array_equal(tokens, expected)
    assert mask[0].sum() <= 3 and (tokens[0, mask[0].sum() :] == 0).all()  # row 0 ended early
    for row in range(3):  # mask: 1 up to and including the first EOS
        hits = np.flatnonzero(tokens[row] == eos)
        length = hits[0] + 1 if hits.size else STEPS
        assert mask[row].tolist() == [1] * length + [0] * (STEPS - length)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_recorded_logprobs_equal_full_forward(llama, temperature, top_k, top_p):
    _, mdef, params, frozen, ids = llama
    uniforms = shared.sampling_uniforms(0, 1, 0, shape=(3, STEPS))
    sp = SamplingParams(
        max_new_tokens=STEPS, eos_ids=(7,), pad_id=0, temperature=temperature, top_k=top_k,
        top_p=top_p,
    )
    out = generate(mdef, params, frozen, ids, PROMPT_MASK, uniforms, sp)
    seq = jnp.concatenate([ids, out.tokens], axis=1)
    mask = jnp.concatenate([PROMPT_MASK, out.response_mask], axis=1)
    logits, _ = mdef.merge(params, frozen)(seq, mask)
    p = ids.shape[1]
    full = shared.token_logprobs(logits[:, p - 1 : -1], out.tokens)  # temperature 1, unfiltered
    real = np.asarray(out.response_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[real], np.asarray(full)[real], atol=1e-5)
    assert (np.asarray(out.logprobs)[~real] == 0).all()


def test_same_uniforms_same_tokens_and_they_matter(llama):
    _, mdef, params, frozen, ids = llama
    sp = SamplingParams(max_new_tokens=STEPS, eos_ids=(7,), pad_id=0)
    u = shared.sampling_uniforms(5, 0, 0, shape=(3, STEPS))
    first = generate(mdef, params, frozen, ids, PROMPT_MASK, u, sp)
    again = generate(mdef, params, frozen, ids, PROMPT_MASK, u.copy(), sp)
    other = generate(mdef, params, frozen, ids, PROMPT_MASK, 1 - u, sp)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)
    # the numpy reference: step 0 of every row is shared.sample_token on the prefill logits
    logits, _ = mdef.merge(params, frozen)(ids, PROMPT_MASK)
    step0 = shared.sample_token(np.asarray(logits[:, -1], np.float64), u[:, 0].astype(np.float64))
    np.testing.assert_array_equal(np.asarray(first.tokens[:, 0]), step0)
