"""``rlhf plan`` at ZeRO-3: each DeepSpeed buffer of ``shared.plan.zero3_buffers`` by hand, the
DeepSpeed settings it reads against the configs the torch backend builds, the rollout's whole
actor gather over several ranks and ZeRO-3's import cost in a CPU process. Fast: no engine,
no subprocess, no timing."""

from __future__ import annotations

import dataclasses

import pytest

from shared.model_size import model_shape
from shared.plan import (
    BASELINE_RSS_BYTES,
    DEEPSPEED_ZERO,
    ZERO3_IMPORT_RSS_BYTES,
    estimate,
    zero3_buffers,
)

SHAPE = model_shape(dict(model_type="llama", vocab_size=64, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False))


def _plan(*, stage=3, world_size=1, dtype="fp32", backend="torch", offload=False):
    value = dataclasses.replace(SHAPE, value_head=True)
    return estimate({"lm": SHAPE, "value": value},
                    models=("actor", "reference", "critic", "reward_model"), dtype=dtype,
                    world_size=world_size, actor_zero_stage=stage, critic_zero_stage=stage,
                    offload=offload, offload_reference=False, generation_batch=4,
                    training_batch=2, prompt_len=8, answer_len=8, actor_lora=(0, (), False),
                    critic_lora=(0, (), False), actor_checkpointing=False,
                    critic_checkpointing=False, device_memory_gib=80.0, backend=backend)


def test_trained_fp32_one_rank_buffers_by_hand():
    p = 1_000_000
    z3 = zero3_buffers(params=p, trainable=p, width=4, world_size=1, trained=True,
                       offload=False)
    assert z3 == {"lp_param_buffer": 4 * p, "gathered_params": 0,
                  "grad_partitions_flat_buffer": 4 * p,
                  "fp32_partitioned_groups_flat": 0,  # the fp32 master is the lp buffer
                  "fp32_gradient_buffer": 4 * p, "adam_states": 8 * p,
                  "ipg_bucket": 4 * p}


def test_trained_bf16_eight_ranks_buffers_by_hand():
    p = 80_000_000
    z3 = zero3_buffers(params=p, trainable=p, width=2, world_size=8, trained=True,
                       offload=False)
    assert z3["lp_param_buffer"] == z3["grad_partitions_flat_buffer"] == 2 * p // 8
    assert z3["fp32_partitioned_groups_flat"] == z3["fp32_gradient_buffer"] == 4 * p // 8
    assert z3["adam_states"] == 8 * p // 8
    assert z3["ipg_bucket"] == 2 * p  # full gradients, not partitioned
    assert z3["gathered_params"] == 2 * 30_000_000  # stage3_max_live_parameters


def test_fp32_gradient_buffer_is_one_sub_group_and_whole_with_offload():
    p = 3_000_000_000
    on_device = zero3_buffers(params=p, trainable=p, width=2, world_size=1, trained=True,
                              offload=False)
    assert on_device["fp32_gradient_buffer"] == 4 * 1_000_000_000  # sub_group_size
    assert on_device["ipg_bucket"] == 2 * 500_000_000  # reduce_bucket_size
    offloaded = zero3_buffers(params=p, trainable=p, width=4, world_size=1, trained=True,
                              offload=True)
    assert offloaded["fp32_gradient_buffer"] == 4 * p
    assert offloaded["fp32_partitioned_groups_flat"] == 4 * p  # a copy on the host


def test_frozen_model_holds_its_partition_and_gathers_over_several_ranks():
    p = 2_000_000_000
    one = zero3_buffers(params=p, trainable=0, width=2, world_size=1, trained=False,
                        offload=False)
    assert one == {"lp_param_buffer": 2 * p, "gathered_params": 0}
    four = zero3_buffers(params=p, trainable=0, width=2, world_size=4, trained=False,
                         offload=False)
    assert four == {"lp_param_buffer": 2 * p // 4, "gathered_params": 2 * 1_000_000_000}


def test_estimate_places_the_buffers():
    plan = _plan(stage=3, world_size=1, dtype="fp32")
    actor = next(m for m in plan.models if m.name == "actor")
    z3 = zero3_buffers(params=actor.params, trainable=actor.trainable, width=4,
                       world_size=1, trained=True, offload=False)
    assert actor.device["weights"] == z3["lp_param_buffer"]
    assert actor.device["gradients"] == z3["grad_partitions_flat_buffer"]
    assert actor.device["optimizer"] == z3["fp32_gradient_buffer"] + z3["adam_states"]
    assert actor.device["buffers"] == z3["ipg_bucket"]
    host = next(m for m in _plan(stage=3, offload=True).models if m.name == "actor").host
    assert host["optimizer"] == 16 * actor.params  # master copy + fp32 grads + m + v


def test_rollout_gathers_the_whole_actor_over_several_ranks_only():
    width = 2
    one, four = _plan(dtype="bf16"), _plan(dtype="bf16", world_size=4)
    for plan, extra in ((one, 0), (four, SHAPE.params * width - min(SHAPE.params,
                                                                     30_000_000) * width)):
        resident = sum(m.device[k] for m in plan.models
                       for k in ("weights", "gradients", "optimizer", "buffers"))
        actor = next(m for m in plan.models if m.name == "actor")
        assert plan.phases["generation"] == resident + actor.device["kv_cache"] + extra


def test_process_rss_adds_zero3_imports_for_torch_only():
    for stage, backend, extra in ((3, "torch", ZERO3_IMPORT_RSS_BYTES["torch"]),
                                  (2, "torch", 0), (3, "jax", 0)):
        plan = _plan(stage=stage, backend=backend)
        assert plan.zero3 == (extra > 0)
        assert plan.process_rss_bytes == (BASELINE_RSS_BYTES[backend] + extra
                                          + plan.peak_bytes + plan.host_bytes)


def test_settings_match_the_torch_backends_deepspeed_configs():
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    from torch_rlhf.deepspeed_config import make_ds_config, make_eval_ds_config

    train = zero_config.DeepSpeedZeroConfig(**make_ds_config(
        stage=3, offload=False, dtype="bf16", train_micro_batch_size_per_gpu=1)[
            "zero_optimization"])
    frozen = zero_config.DeepSpeedZeroConfig(**make_eval_ds_config(
        stage=3, offload=False, dtype="bf16")["zero_optimization"])
    assert train.reduce_bucket_size == DEEPSPEED_ZERO["reduce_bucket_size"]
    assert train.sub_group_size == DEEPSPEED_ZERO["sub_group_size"]
    live = DEEPSPEED_ZERO["stage3_max_live_parameters"]
    assert (train.max_live_parameters, frozen.max_live_parameters) == (
        live["trained"], live["frozen"])
