"""Level 5 (partial): the torch and JAX samplers, given the same weights, prompts and uniforms,
decode the same tokens (greedy and sampled) and record the same log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shared
from parity_tests import batches as B
from parity_tests.decoding import decode_both, jax_sampler_available, sampler_rows
from parity_tests.harness import FAMILIES, assert_passed

pytestmark = pytest.mark.skipif(jax_sampler_available() is not None,
                                reason=str(jax_sampler_available()))

STEPS = 6


def _eos_that_ends_row_zero_early(lm, prompts) -> int:
    """A token greedy decoding emits at step 2 of row 0, so rows end at different steps."""
    from torch_rlhf.generation import generate

    out = generate(lm.torch, torch.from_numpy(prompts["input_ids"]),
                   torch.from_numpy(prompts["attention_mask"]), max_new_tokens=STEPS,
                   eos_token_id=None, pad_token_id=B.PAD)
    return int(out.response[0, 2])


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f == "llama_gqa_untied" else pytest.mark.slow)
               for f in FAMILIES])
@pytest.mark.parametrize("filters", [
    dict(),
    pytest.param(dict(temperature=0.7, top_k=8, top_p=0.9), marks=pytest.mark.slow),
], ids=["plain", "filtered"])
def test_decoding(pair, family, filters):
    lm = pair(family, "lm")
    prompts = B.forward_batch(lm.vocab_size, "left", width=6, seed=5)
    eos = _eos_that_ends_row_zero_early(lm, prompts)
    rows = sampler_rows(lm, prompts["input_ids"], prompts["attention_mask"],
                        max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=B.PAD, seed=11,
                        **filters)
    assert [r.quantity for r in rows][:3] == [
        "greedy tokens", "greedy response_mask", "greedy recorded logprobs"]
    greedy_ended = rows[0].note
    assert not greedy_ended.startswith("0/"), f"no row ended early: {greedy_ended}"
    assert_passed(rows)


def test_sampling_is_not_greedy(pair):
    """Guard against a vacuous sampled comparison: the uniforms must change the answers."""
    lm = pair("llama_gqa_untied", "lm")
    prompts = B.forward_batch(lm.vocab_size, "left", width=6, seed=5)
    uniforms = shared.sampling_uniforms(11, 0, 0, shape=(3, STEPS))
    kwargs = dict(max_new_tokens=STEPS, eos_token_id=B.EOS, pad_token_id=B.PAD, temperature=1.0,
                  top_k=0, top_p=1.0)
    greedy = decode_both(lm, prompts["input_ids"], prompts["attention_mask"], uniforms,
                         do_sample=False, **kwargs)
    sampled = decode_both(lm, prompts["input_ids"], prompts["attention_mask"], uniforms,
                          do_sample=True, **kwargs)
    for backend in ("torch", "jax"):
        assert not np.array_equal(greedy[backend][0], sampled[backend][0]), backend
    np.testing.assert_array_equal(sampled["torch"][0], sampled["jax"][0])
