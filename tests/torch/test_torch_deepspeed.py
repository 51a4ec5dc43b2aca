"""torch_rlhf.deepspeed_config: config blocks, and real ZeRO 0-3 engines on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tiny_hf import left_padded_prompts

from torch_rlhf.deepspeed_config import (
    initialize_engine,
    make_ds_config,
    make_eval_ds_config,
    reference_zero_stage,
)
from torch_rlhf.generation import generate
from torch_rlhf.lora import apply_lora
from torch_rlhf.models import build_causal_lm, build_value_model, causal_lm_logits
from torch_rlhf.saving import gather_params_for, save_hf

# DeepSpeed 0.19.8's own calls into torch 2.13 APIs it has not migrated yet.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

TRAIN = dict(train_micro_batch_size_per_gpu=3)


def test_train_config_matches_dschat_layout():
    config = make_ds_config(stage=2, offload=False, dtype="bf16", gradient_accumulation_steps=4,
                            world_size=2, max_grad_norm=0.5, **TRAIN)
    assert config["train_batch_size"] == 3 * 4 * 2
    assert config["gradient_accumulation_steps"] == 4
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_param"] == {"device": "none"}
    assert zero["offload_optimizer"] == {"device": "none"}
    assert zero["stage3_param_persistence_threshold"] == 1e4
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert "fp16" not in config
    assert config["gradient_clipping"] == 0.5
    assert config["hybrid_engine"]["enabled"] is False
    assert config["zero_allow_untested_optimizer"] is True
    assert "tensorboard" not in config


def test_offload_config_blocks():
    train = make_ds_config(stage=3, offload=True, dtype="fp16", **TRAIN)
    assert train["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert train["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert train["zero_force_ds_cpu_optimizer"] is False  # our AdamW is allowed
    assert train["fp16"] == {"enabled": True, "loss_scale_window": 100}
    ref = make_eval_ds_config(stage=3, offload=True, dtype="fp16")
    assert ref["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 1e4,
                                        "offload_param": {"device": "cpu"},
                                        "memory_efficient_linear": False}
    assert ref["fp16"] == {"enabled": True}
    assert "offload_optimizer" not in ref["zero_optimization"]


def test_hybrid_engine_and_tensorboard_blocks():
    config = make_ds_config(stage=3, offload=False, dtype="fp32", enable_hybrid_engine=True,
                            inference_tp_size=2, release_inference_cache=True,
                            pin_parameters=False, tp_gather_partition_size=4,
                            max_out_tokens=384, tensorboard={"output_path": "/tmp/tb",
                                                             "job_name": "step3_actor"},
                            **TRAIN)
    assert config["hybrid_engine"] == {
        "enabled": True, "max_out_tokens": 384, "inference_tp_size": 2,
        "release_inference_cache": True, "pin_parameters": False,
        "tp_gather_partition_size": 4}
    assert config["tensorboard"] == {"enabled": True, "output_path": "/tmp/tb",
                                     "job_name": "step3_actor"}
    assert "fp16" not in config and "bf16" not in config


@pytest.mark.parametrize("bad", [dict(stage=4), dict(dtype="fp8"),
                                 dict(train_micro_batch_size_per_gpu=0),
                                 dict(tensorboard={"job_name": "x"})])
def test_invalid_config_values_are_named(bad):
    kwargs = dict(stage=0, offload=False, dtype="fp32", **TRAIN) | bad
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        make_ds_config(**kwargs)


def test_reference_stage_follows_dschat():
    assert [reference_zero_stage(s) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    with pytest.raises(ValueError, match="inference engine"):
        make_eval_ds_config(stage=2, offload=False, dtype="fp32")


def _train_step(engine, ids, mask):
    loss = engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("stage,offload", [(0, False), (1, False), (2, False), (3, False),
                                           (2, True), (3, True)])
def test_zero_stage_trains_one_step(stage, offload, distributed, model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = initialize_engine(model, optimizer=optimizer, config=make_ds_config(
        stage=stage, offload=offload, dtype="fp32", **TRAIN))
    assert engine.zero_optimization_stage() == stage
    ids, mask = left_padded_prompts()
    first = _train_step(engine, ids, mask)
    second = _train_step(engine, ids, mask)
    assert math.isfinite(first) and math.isfinite(second)
    assert second < first  # the step moved the weights downhill on this batch


def _fully_partitioned(config):
    # Tiny parameters would all stay resident under DS-Chat's 1e4-element threshold.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def test_zero3_save_gathers_full_weights_and_generates(distributed, model_dirs, tmp_path):
    reference = build_causal_lm(model_dirs("opt_350m_shape"))
    ids, mask = left_padded_prompts()
    expected = generate(reference, ids, mask, max_new_tokens=4, eos_token_id=None,
                        pad_token_id=0)
    model = build_causal_lm(model_dirs("opt_350m_shape"))
    engine = initialize_engine(model, config=_fully_partitioned(
        make_eval_ds_config(stage=3, offload=False, dtype="fp32")))
    causal_lm_logits(engine, ids, mask)
    assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 partitions all"
    got = generate(engine, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=1e-5)
    save_hf(engine, None, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                                 attn_implementation="eager")
    torch.testing.assert_close(causal_lm_logits(reloaded, ids, mask),
                               causal_lm_logits(reference, ids, mask), rtol=0, atol=1e-5)


def test_zero3_lora_critic_trains_saves_and_updates_in_place(distributed, model_dirs, tmp_path):
    critic = build_value_model(model_dirs("llama_gqa_untied"), pad_token_id=0)
    apply_lora(critic, dim=4, module_name="layers.", only_optimize=True)
    optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=0.1)
    engine = initialize_engine(critic, optimizer=optimizer, config=_fully_partitioned(
        make_ds_config(stage=3, offload=False, dtype="fp32", **TRAIN)))
    ids, mask = left_padded_prompts()
    loss = (engine(ids, mask) - 1.0).pow(2).mean()
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        values = engine(ids, mask)  # training mode: ZeRO-3 keeps these parameters for backward
    save_hf(engine, None, str(tmp_path))
    reloaded = build_value_model(str(tmp_path))
    torch.testing.assert_close(reloaded(ids, mask), values, rtol=0, atol=1e-5)
    # An in-place change made by rank 0 inside the gather survives re-partitioning (EMA).
    head = engine.module.model.score.weight
    with gather_params_for(engine, modifier_rank=0):
        assert head.numel() == 32
        head.data.zero_()
    with torch.no_grad():
        assert torch.count_nonzero(engine(ids, mask)) == 0


def test_zero3_partitions_weights_while_loading(distributed, model_dirs):
    config = make_ds_config(stage=3, offload=False, dtype="fp32", **TRAIN)
    model = build_causal_lm(model_dirs("gpt2"), ds_config=config, vocab_size=70)
    # Built inside zero.Init (transformers re-creates the resized embedding outside it;
    # deepspeed.initialize partitions that one).
    blocks = [p for n, p in model.named_parameters() if ".h." in n]
    assert blocks and all(hasattr(p, "ds_id") and p.numel() == 0 for p in blocks)
    reference = build_causal_lm(model_dirs("gpt2"))
    with gather_params_for(model):
        assert model.get_input_embeddings().weight.shape[0] == 72
        torch.testing.assert_close(model.lm_head.weight[:64], reference.lm_head.weight)
    engine = initialize_engine(model, optimizer=torch.optim.AdamW(model.parameters()),
                               config=config)
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        got = causal_lm_logits(engine, ids, mask)[..., :64]
    real = mask.bool()
    torch.testing.assert_close(got[real], causal_lm_logits(reference, ids, mask)[real],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"),
                                         (2, "bf16")])
def test_non_finite_gradients_are_never_applied(stage, dtype, distributed, model_dirs):
    """A NaN loss (hence NaN gradients) skips the step whatever the ZeRO stage and dtype:
    the weights, the optimiser and the schedule stay; `optimizer_step` reports a NaN norm
    (shared.guard counts it); the next finite step trains as usual."""
    from torch_rlhf.optim import optimizer_step

    model = build_causal_lm(model_dirs("llama_gqa_untied"), dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = initialize_engine(model, optimizer=optimizer, config=make_ds_config(
        stage=stage, offload=False, dtype=dtype, **TRAIN))
    ids, mask = left_padded_prompts()

    def weights():
        with gather_params_for(engine.module):
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}

    before, lr = weights(), engine.get_lr()[0]
    loss = engine(input_ids=ids, attention_mask=mask,
                  labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss * float("nan"))
    assert math.isnan(optimizer_step(engine))
    after = weights()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert engine.skipped_steps == 1 and engine.get_lr()[0] == lr
    loss = engine(input_ids=ids, attention_mask=mask,
                  labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss)
    assert math.isfinite(optimizer_step(engine))
    assert any(not torch.equal(before[n], w) for n, w in weights().items())
