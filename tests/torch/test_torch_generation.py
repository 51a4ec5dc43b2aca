"""torch_rlhf.generation: the parity sampler, and every Hybrid Engine path reachable on CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_hf import EOS, PAD, left_padded_prompts

from shared import console
from shared.logprobs import token_logprobs
from shared.sampling import sample_token
from torch_rlhf import generation
from torch_rlhf.deepspeed_config import (
    HybridEngineUnavailable,
    initialize_engine,
    make_ds_config,
)
from torch_rlhf.generation import (
    generate,
    generate_rollout,
    generation_output_from_hf,
    select_rollout_path,
    try_hybrid_engine_generate,
)
from torch_rlhf.models import build_causal_lm, causal_lm_logits, position_ids_from_mask

# DeepSpeed 0.19.8's own calls into torch 2.13 APIs it has not migrated yet.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


@pytest.fixture(autouse=True)
def _facts_said_anew():
    """The rollout path is a one-time fact (`shared.console.say_once`): each test here checks
    what is logged, so each starts as a fresh process would."""
    console._said.clear()
    yield


PARITY_FAMILIES = ["llama_gqa_untied", "opt_350m_shape", "gpt2"]
N = 6
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)


def _uniforms(seed: int, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, N))


def _hf_greedy(model, ids, mask, *, eos_token_id):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=PAD,
                         return_dict_in_generate=True, output_logits=True)
    return out


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_greedy_matches_hf_generate(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    ids, mask = left_padded_prompts()
    ours = generate(model, ids, mask, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
    hf = _hf_greedy(model, ids, mask, eos_token_id=EOS)
    width = hf.sequences.shape[1]
    assert torch.equal(ours.sequences[:, :width], hf.sequences)
    assert (ours.sequences[:, width:] == PAD).all()  # HF stops once every row ended
    # The same conversion serves the Hybrid Engine path (its generate is HF's).
    converted = generation_output_from_hf(hf.sequences, hf.logits, ids, mask,
                                          max_new_tokens=N, eos_token_id=EOS,
                                          pad_token_id=PAD)
    assert torch.equal(converted.sequences, ours.sequences)
    assert torch.equal(converted.response_mask, ours.response_mask)
    torch.testing.assert_close(converted.logprobs, ours.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_recorded_logprobs_equal_training_forward(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD,
                   uniforms=_uniforms(0), **SAMPLING)
    assert out.sequences.shape == (3, ids.shape[1] + N)
    assert out.logprobs.dtype == torch.float32
    logits = causal_lm_logits(model, out.sequences, out.attention_mask)
    recomputed = token_logprobs(logits[:, :-1], out.sequences[:, 1:])[:, ids.shape[1] - 1:]
    recomputed = recomputed * out.response_mask
    torch.testing.assert_close(out.logprobs, recomputed.detach(), rtol=0, atol=1e-5)


def _reference_sampler(model, ids, mask, uniforms, *, eos_token_id):
    """No KV cache: a full forward over the whole sequence for every new token."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    tokens = []
    with torch.no_grad():
        for step in range(N):
            logits = model(input_ids=ids, attention_mask=mask,
                           position_ids=position_ids_from_mask(mask)).logits[:, -1]
            token = sample_token(logits.float(), torch.as_tensor(uniforms[:, step]),
                                 **SAMPLING)
            token = torch.where(finished, torch.full_like(token, PAD), token)
            finished |= token == eos_token_id
            tokens.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("family", ["llama_gqa_tied", "opt_pre_ln"])
def test_cached_sampling_matches_uncached_reference(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    ids, mask = left_padded_prompts(seed=1)
    uniforms = _uniforms(1)
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD,
                   uniforms=torch.as_tensor(uniforms), **SAMPLING)
    assert torch.equal(out.response, _reference_sampler(model, ids, mask, uniforms,
                                                        eos_token_id=EOS))


def test_same_uniforms_same_tokens(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"))
    ids, mask = left_padded_prompts()
    runs = [generate(model, ids, mask, max_new_tokens=N, eos_token_id=None, pad_token_id=PAD,
                     uniforms=_uniforms(seed), do_sample=True) for seed in (3, 3, 4)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=0)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    assert (runs[0].response_mask == 1).all()  # no EOS: every row runs N steps


def test_rows_stop_at_eos(model_dirs):
    model = build_causal_lm(model_dirs("opt_350m_shape"))
    ids, mask = left_padded_prompts()
    free = generate(model, ids, mask, max_new_tokens=N, eos_token_id=None, pad_token_id=PAD)
    eos = int(free.response[0, 1])  # make row 0's second token the EOS
    out = generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    assert out.response_mask[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert out.response[0, :2].tolist() == free.response[0, :2].tolist()
    assert (out.response[0, 2:] == PAD).all() and (out.logprobs[0, 2:] == 0).all()
    for row in range(3):  # every row: mask 1 up to and including its first EOS
        hits = (free.response[row] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else N
        assert out.response_mask[row].tolist() == [1] * length + [0] * (N - length)
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], 1))


def test_generate_restores_training_mode_and_checks_inputs(model_dirs):
    model = build_causal_lm(model_dirs("gpt2"))
    model.train()
    ids, mask = left_padded_prompts()
    generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    assert model.training
    with pytest.raises(ValueError, match="uniforms"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
                 do_sample=True)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
                 do_sample=True, uniforms=np.zeros((3, 5)))


# ------------------------------------------------------------------ rollout path
#
# DeepSpeed refuses the Hybrid Engine on CPU, and how depends on the model and on the
# DeepSpeed / transformers versions (torch_rlhf.generation's docstring): an exception in
# deepspeed.initialize, or an engine without inference containers whose generate raises.
# These tests accept any refusal, and check what the rollout path does with it.

HYBRID_FAMILIES = ["llama_gqa_untied", "gpt2", "opt_350m_shape"]
ROLLOUT = dict(max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD, do_sample=True)


def test_select_rollout_path():
    for mode in ("auto", "on"):
        assert select_rollout_path(mode, device_type="cuda", model_type="llama")[0] == (
            "hybrid_engine")
    assert select_rollout_path("off", device_type="cuda", model_type="llama")[0] == "module"
    for model_type in ("llama", "opt", "gpt2"):
        path, reason = select_rollout_path("auto", device_type="cpu", model_type=model_type)
        assert path == "module"
        assert "Hybrid Engine cannot run on CPU" in reason and model_type in reason
    with pytest.raises(RuntimeError, match="Hybrid Engine cannot run on CPU.*auto or off"):
        select_rollout_path("on", device_type="cpu", model_type="gpt2")
    with pytest.raises(ValueError, match="allowed: auto, on, off"):
        select_rollout_path("yes", device_type="cpu", model_type="gpt2")


def _decide_as_on_cuda(monkeypatch) -> None:
    """``select_rollout_path`` decides as on a CUDA machine, so ``generate_rollout`` tries the
    Hybrid Engine (which then refuses on CPU) instead of skipping it up front."""
    real = generation.select_rollout_path
    monkeypatch.setattr(generation, "select_rollout_path",
                        lambda mode, *, device_type, model_type: real(
                            mode, device_type="cuda", model_type=model_type))


@pytest.fixture
def as_on_cuda(monkeypatch):
    _decide_as_on_cuda(monkeypatch)


def _hybrid_config():
    return make_ds_config(stage=0, offload=False, dtype="fp32", enable_hybrid_engine=True,
                          max_out_tokens=32, train_micro_batch_size_per_gpu=3)


def _plain_config():
    return make_ds_config(stage=0, offload=False, dtype="fp32", train_micro_batch_size_per_gpu=3)


def _build_actor(model_dir):
    """The actor as ``RLHFEngine`` builds it under ``auto``: a Hybrid Engine, or, where
    ``deepspeed.initialize`` refuses it, a fresh model in a plain engine.

    Returns (engine, model, the refusal at initialize or None)."""
    model = build_causal_lm(model_dir)
    try:
        engine = initialize_engine(model, config=_hybrid_config(),
                                   optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
        return engine, model, None
    except HybridEngineUnavailable as err:
        refusal = err
    model = build_causal_lm(model_dir)
    engine = initialize_engine(model, config=_plain_config(),
                               optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    return engine, model, refusal


def _assert_names_its_cause(refusal: HybridEngineUnavailable) -> None:
    cause = refusal.__cause__
    assert cause is not None, "the refusal must chain what DeepSpeed raised"
    assert f"{type(cause).__name__}: {cause}" in str(refusal)


def _assert_module_rollout(out, path, model, ids, mask, seed):
    expected = generate(model, ids, mask, uniforms=_uniforms(seed), **ROLLOUT)
    assert path == "module"
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.logprobs, expected.logprobs, rtol=0, atol=0)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_engine_refuses_on_cpu_and_rollouts_fall_back(family, distributed, model_dirs,
                                                             caplog, monkeypatch):
    engine, model, refusal = _build_actor(model_dirs(family))
    ids, mask = left_padded_prompts()
    if refusal is None:  # DeepSpeed built a Hybrid Engine: it must refuse to generate
        assert type(engine).__name__ == "DeepSpeedHybridEngine"
        engine.train()
        with pytest.raises(HybridEngineUnavailable, match="could not generate") as err:
            try_hybrid_engine_generate(engine, ids, mask, **ROLLOUT)
        refusal = err.value
        assert engine.training  # the eval() -> generate -> train() cycle is closed on failure
    _assert_names_its_cause(refusal)

    # On CPU the rollout path is decided up front: `on` fails, `auto` uses the module.
    with pytest.raises(RuntimeError, match="Hybrid Engine cannot run on CPU.*auto or off"):
        generate_rollout(engine, ids, mask, hybrid_engine="on", uniforms=_uniforms(5), **ROLLOUT)
    with caplog.at_level(logging.INFO, logger="torch_rlhf.generation"):
        out, path = generate_rollout(engine, ids, mask, hybrid_engine="auto",
                                     uniforms=_uniforms(5), **ROLLOUT)
    assert "rollout path: module (the DeepSpeed Hybrid Engine cannot run on CPU" in caplog.text
    _assert_module_rollout(out, path, model, ids, mask, seed=5)

    # Where it is tried (as on CUDA), the refusal itself makes `auto` fall back and `on` fail.
    _decide_as_on_cuda(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torch_rlhf.generation"):
        out, path = generate_rollout(engine, ids, mask, hybrid_engine="auto",
                                     uniforms=_uniforms(6), **ROLLOUT)
    assert "rollout path: module (falling back from the Hybrid Engine: " in caplog.text
    _assert_module_rollout(out, path, model, ids, mask, seed=6)
    with pytest.raises(HybridEngineUnavailable, match="hybrid_engine is on, but .*auto"):
        generate_rollout(engine, ids, mask, hybrid_engine="on", uniforms=_uniforms(6), **ROLLOUT)


# Exceptions DeepSpeed raises, or might, when it refuses the Hybrid Engine.
REFUSALS = [
    ValueError("This op had not been implemented on CPU backend."),
    AttributeError("'DeepSpeedHybridEngine' object has no attribute '_generate'"),
    AttributeError("'OPTAttention' object has no attribute 'k_proj'"),
    RuntimeError("CUDA error: no kernel image is available for execution on the device"),
    NotImplementedError("inference containers"),
    KeyError("OPTDecoderLayer"),
    TypeError("forward() got an unexpected keyword argument 'cache'"),
    ImportError("cannot import name 'InferenceBuilder'"),
]


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: type(e).__name__)
def test_initialize_engine_reports_any_hybrid_engine_failure(error, monkeypatch):
    import deepspeed

    def refuse(**kwargs):
        raise error

    monkeypatch.setattr(deepspeed, "initialize", refuse)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(HybridEngineUnavailable, match="auto or off") as err:
        initialize_engine(model, config=_hybrid_config())
    assert err.value.__cause__ is error
    _assert_names_its_cause(err.value)
    if "not been implemented on CPU" in str(error):
        assert "cannot run on CPU" in str(err.value)
    with pytest.raises(type(error)) as err:  # without the Hybrid Engine: as raised
        initialize_engine(model, config=_plain_config())
    assert err.value is error


@pytest.mark.parametrize("error", REFUSALS, ids=lambda e: type(e).__name__)
def test_any_refusal_at_generate_falls_back_under_auto(error, distributed, model_dirs, caplog,
                                                       monkeypatch, as_on_cuda):
    model = build_causal_lm(model_dirs("gpt2"))
    engine = initialize_engine(model, config=_plain_config())

    modes = []

    def refuse(*args, **kwargs):
        modes.append(engine.module.training)
        raise error

    monkeypatch.setattr(generation, "_is_hybrid_engine", lambda engine: True)
    monkeypatch.setattr(engine, "generate", refuse)
    ids, mask = left_padded_prompts()
    engine.train()
    with pytest.raises(HybridEngineUnavailable, match="engine.generate raised") as err:
        try_hybrid_engine_generate(engine, ids, mask, **ROLLOUT)
    assert err.value.__cause__ is error
    _assert_names_its_cause(err.value)
    assert modes == [False] and engine.module.training  # eval() -> generate -> train()
    with caplog.at_level(logging.WARNING, logger="torch_rlhf.generation"):
        out, path = generate_rollout(engine, ids, mask, hybrid_engine="auto",
                                     uniforms=_uniforms(7), **ROLLOUT)
    assert f"falling back from the Hybrid Engine: {err.value}" in caplog.text
    _assert_module_rollout(out, path, model, ids, mask, seed=7)
    with pytest.raises(HybridEngineUnavailable, match="hybrid_engine is on, but") as on:
        generate_rollout(engine, ids, mask, hybrid_engine="on", uniforms=_uniforms(7),
                         **ROLLOUT)
    assert str(err.value) in str(on.value)


def test_plain_engine_is_not_a_hybrid_engine(distributed, model_dirs, caplog, as_on_cuda):
    model = build_causal_lm(model_dirs("gpt2"))
    engine = initialize_engine(model, config=_plain_config())
    ids, mask = left_padded_prompts()
    with pytest.raises(HybridEngineUnavailable, match="not a DeepSpeed Hybrid Engine"):
        try_hybrid_engine_generate(engine, ids, mask, max_new_tokens=2, eos_token_id=EOS,
                                   pad_token_id=PAD)
    with caplog.at_level(logging.WARNING, logger="torch_rlhf.generation"):
        out, path = generate_rollout(engine, ids, mask, hybrid_engine="auto",
                                     uniforms=_uniforms(8), **ROLLOUT)
    assert "not a DeepSpeed Hybrid Engine" in caplog.text
    _assert_module_rollout(out, path, model, ids, mask, seed=8)
