"""Level 4: N AdamW steps (shared warmup + cosine schedule, decoupled weight decay with the
no-decay groups, global-norm clipping) with each backend's own optimiser construction, from
the same HF weights on the same SFT batches, give the same losses, learning rates, gradient
norms and parameters (HF state-dict names)."""

from __future__ import annotations

import pytest

from parity_tests import batches as B
from parity_tests.harness import FAMILIES, assert_passed
from parity_tests.optimiser import LEVEL4_OPTIM, optimiser_rows

STEPS = 3


def _batches(vocab: int) -> list[dict]:
    return [B.sft_batch(vocab, padding, seed=seed)
            for seed, padding in enumerate(("right", "left", "right")[:STEPS])]


def _run(checkpoint, family: str) -> list:
    path = checkpoint(family, "lm")
    return optimiser_rows(path, _batches(FAMILIES[family]["vocab_size"]), label=family)


def test_adamw_steps_llama(checkpoint):
    rows = _run(checkpoint, "llama_gqa_untied")
    assert_passed(rows)
    # the schedule, the clip and the decay all act in these steps
    lrs = [r for r in rows if r.quantity.endswith(" lr")]
    assert len(lrs) == STEPS
    assert LEVEL4_OPTIM["weight_decay"] > 0 and LEVEL4_OPTIM["max_grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama_gqa_tied", "opt_350m_shape", "gpt2"])
def test_adamw_steps_every_family(checkpoint, family):
    assert_passed(_run(checkpoint, family))


def test_decay_groups_agree_by_name():
    """torch_rlhf.optim.param_groups and jax_rlhf.optim.decays exempt the same HF tensors:
    biases and norm weights (DeepSpeed-Chat's no-decay list)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from jax_rlhf.optim import decays
    from torch_rlhf.optim import NO_DECAY_NAMES

    model = AutoModelForCausalLM.from_config(LlamaConfig(
        **{k: v for k, v in FAMILIES["llama_gqa_untied"].items() if k != "model_type"}))
    for name, param in model.named_parameters():
        torch_decays = not any(key in name.lower() for key in NO_DECAY_NAMES)
        assert torch_decays == (param.ndim > 1), name  # norms are 1-D, no bias in Llama
    assert not decays("layers.0.input_layernorm.scale") and not decays("x.bias")
    assert decays("layers.0.self_attn.q_proj.kernel")
