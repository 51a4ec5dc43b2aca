"""torch_rlhf.rollout_decode: every decode loop gives the module loop's tokens and log-probs.

``static`` and ``packed`` change only where sums are taken (attention over the P + N
preallocated slots, oneDNN's blocked matmuls): tokens must be equal, log-probs within the
rollout tolerance of parity_tests (``rollout_logprobs``: rtol = atol = 1e-5).
``compiled`` (inductor) is behind ``-m slow``: compiling takes tens of seconds on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hf import EOS, PAD, left_padded_prompts

from parity_tests.tolerances import TOLERANCES
from torch_rlhf.generation import generate, generate_rollout
from torch_rlhf.models import build_causal_lm
from torch_rlhf.rollout_decode import check_rollout_decode, packed_linears

FAMILIES = ["llama_gqa_untied", "opt_350m_shape", "gpt2"]
N = 6
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
RTOL, ATOL = TOLERANCES["rollout_logprobs"][:2]


def _decode(model, mode, *, seed=0, eos_token_id=EOS, sampling=None):
    ids, mask = left_padded_prompts(seed=seed)
    uniforms = np.random.default_rng(seed).random((ids.shape[0], N))
    return generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos_token_id,
                    pad_token_id=PAD, uniforms=uniforms, rollout_decode=mode,
                    **(SAMPLING if sampling is None else sampling))


def _assert_same_rollout(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.response_mask, ref.response_mask)
    assert torch.equal(out.attention_mask, ref.attention_mask)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["static", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_equals_module_loop(family, mode, model_dirs):
    model = build_causal_lm(model_dirs(family))
    for sampling in (SAMPLING, dict(do_sample=False)):
        _assert_same_rollout(_decode(model, mode, sampling=sampling),
                             _decode(model, "module", sampling=sampling))


def test_rows_end_at_eos_as_in_module_loop(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"))
    # An EOS id some row samples early: pick one of the module loop's own tokens.
    ref = _decode(model, "module", eos_token_id=None)
    eos = int(ref.response[0, 1])
    out, ref = _decode(model, "static", eos_token_id=eos), _decode(model, "module",
                                                                     eos_token_id=eos)
    assert ref.response_mask[0].tolist() == [1, 1] + [0] * (N - 2)  # row 0 ends at step 1
    _assert_same_rollout(out, ref)


def test_packed_linears_are_restored_and_exact_in_shape(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(2, 3, linears[0].in_features)
    with torch.no_grad():
        plain = linears[0](x)
        with packed_linears(model, batch_size=2) as count:
            assert count == len(linears)
            packed = linears[0](x)
    assert all("forward" not in vars(m) for m in linears)
    assert packed.shape == plain.shape
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)


def test_check_rollout_decode_names_the_bad_value():
    with pytest.raises(ValueError, match="'fast'.*module, static, packed, compiled"):
        check_rollout_decode("fast", device_type="cpu")
    with pytest.raises(ValueError, match="packed needs oneDNN on CPU.*cuda"):
        check_rollout_decode("packed", device_type="cuda")
    check_rollout_decode("static", device_type="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama_gqa_untied", "gpt2"])
def test_compiled_decode_equals_module_loop(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    _assert_same_rollout(_decode(model, "compiled"), _decode(model, "module"))


def test_generate_rollout_passes_the_decode_loop(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"))
    ids, mask = left_padded_prompts()
    uniforms = np.random.default_rng(0).random((ids.shape[0], N))
    out, path = generate_rollout(model, ids, mask, hybrid_engine="off", max_new_tokens=N,
                                 eos_token_id=EOS, pad_token_id=PAD, uniforms=uniforms,
                                 rollout_decode="packed", **SAMPLING)
    assert path == "module"
    _assert_same_rollout(out, _decode(model, "packed"))
    with pytest.raises(ValueError, match="rollout_decode: 'fast' is invalid"):
        generate_rollout(model, ids, mask, hybrid_engine="off", max_new_tokens=N,
                         eos_token_id=EOS, pad_token_id=PAD, rollout_decode="fast")
