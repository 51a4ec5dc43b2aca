"""ZeRO-3 rollouts after a training step: generation gathers the engine's parameters once
and lifts its fetch / release hooks for the decode, so no prefetch is left in flight when
the gather ends (DeepSpeed's "Cannot partition a param in flight", hit by the bench's
35M-parameter model at its second rollout: the model exceeds DS-Chat's 3e7 live / prefetch
limits). The tiny models reach the same state with the limits lowered below their size;
the order that fails is rollout, training step, rollout."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_configs import family_models, merge, write_config
from tiny_hf import left_padded_prompts

import torch_rlhf.deepspeed_config as ds_config_module
from torch_rlhf.deepspeed_config import initialize_engine, make_ds_config
from torch_rlhf.generation import generate
from torch_rlhf.models import build_causal_lm
from torch_rlhf.ppo import PPOTrainer
from torch_rlhf.saving import gather_params_for, gather_params_for_forward

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

FAMILY = "llama_gqa_untied"  # ~23k parameters, the largest 6k (gate / up / down)


@pytest.fixture
def few_live_parameters(monkeypatch):
    """Every parameter partitioned; fewer elements live / prefetched at once than the
    model holds, so ZeRO-3 prefetches layer by layer as it does for the bench's model."""
    monkeypatch.setattr(ds_config_module, "_PERSISTENCE_THRESHOLD", 0)
    monkeypatch.setattr(ds_config_module, "_MAX_LIVE_PARAMETERS", 8000)
    monkeypatch.setattr(ds_config_module, "_PREFETCH_BUCKET_SIZE", 8000)


def _engine(model_dir):
    model = build_causal_lm(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return initialize_engine(model, optimizer=optimizer, config=make_ds_config(
        stage=3, offload=False, dtype="fp32", train_micro_batch_size_per_gpu=3))


def _train_step(engine) -> float:
    ids, mask = left_padded_prompts()
    loss = engine(input_ids=ids, attention_mask=mask,
                  labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def test_generate_after_a_zero3_training_step(distributed, model_dirs, few_live_parameters):
    engine = _engine(model_dirs(FAMILY))
    plain = build_causal_lm(model_dirs(FAMILY))
    ids, mask = left_padded_prompts(seed=1)
    for _ in range(2):  # rollout, steps, rollout (on the hooks re-registered after the first)
        with gather_params_for(engine):
            plain.load_state_dict(engine.module.state_dict())  # the weights after the steps
        expected = generate(plain, ids, mask, max_new_tokens=4, eos_token_id=None,
                            pad_token_id=0)
        got = generate(engine, ids, mask, max_new_tokens=4, eos_token_id=None,
                       pad_token_id=0)
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=1e-5)
        assert all(p.numel() == 0 for p in engine.module.parameters()), "re-partitioned"
        first = _train_step(engine)  # the re-registered hooks fetch for the step
        assert _train_step(engine) < first  # same batch: the steps still move downhill


def test_the_bare_module_of_a_zero3_engine_is_refused(distributed, model_dirs,
                                                       few_live_parameters):
    engine = _engine(model_dirs(FAMILY))
    with pytest.raises(ValueError, match="needs the DeepSpeed engine"):
        with gather_params_for_forward(engine.module):
            pass


def test_zero3_ppo_iterations(tmp_path, distributed, model_dirs, data_cache,
                              few_live_parameters):
    data = merge({"data": {"cache_dir": data_cache}, "ppo": {"unsup_coef": 0.0},
                  "engine": {"torch": {"actor_zero_stage": 3, "critic_zero_stage": 3}}},
                 family_models(model_dirs(FAMILY)))
    _, config = write_config(tmp_path, data)
    trainer = PPOTrainer(config, run_dir=tmp_path / "run")
    for iteration in range(2):  # the second rollout follows a ZeRO-3 training step
        experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(),
                                                 iteration=iteration, batch_index=0)
        assert experience.sample_mask.sum() > 0
        metrics = trainer.train_on_experience([experience], iteration=iteration)
        assert math.isfinite(metrics["actor_loss"]) and math.isfinite(metrics["critic_loss"])
