"""Step 3 on real DeepSpeed engines: a PPO iteration per family, ZeRO-3, EMA, ptx, reference
offload, LoRA, short answers, the Hybrid Engine paths reachable on CPU, split invariance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from export_checks import assert_export_complete
from rlhf_configs import family_models, merge, write_config
from tiny_hf import LORA_MODULE_NAME

import torch_rlhf.deepspeed_config as ds_config_module
from torch_rlhf.models import unwrap_model
from torch_rlhf.ppo import PPOTrainer
from torch_rlhf.saving import gather_params_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

PPO_METRICS = {"actor_loss", "critic_loss", "pg_loss", "clip_fraction", "approx_kl",
               "value_clip_fraction", "entropy", "reward_score", "kl", "kl_coef",
               "advantages_mean", "returns_mean", "response_length", "short_answers",
               "rollout_logprob_gap", "ptx_loss", "actor_lr", "critic_lr", "generation_time",
               "scoring_time", "training_time", "rollout_path"}


def _trainer(tmp_path, data_cache, model_dir, overrides=None, **kwargs) -> PPOTrainer:
    data = merge({"data": {"cache_dir": data_cache}, "ppo": {"unsup_coef": 0.0}},
                 family_models(model_dir))
    _, config = write_config(tmp_path, merge(data, overrides or {}))
    return PPOTrainer(config, run_dir=tmp_path / "run", **kwargs)


def _weights(engine) -> dict[str, torch.Tensor]:
    with gather_params_for(engine):
        return {n: p.detach().clone() for n, p in unwrap_model(engine).named_parameters()}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture
def fully_partitioned(monkeypatch):
    """ZeRO-3 really partitions the tiny models (DS-Chat's 1e4-element threshold would keep
    every parameter resident)."""
    monkeypatch.setattr(ds_config_module, "_PERSISTENCE_THRESHOLD", 0)


@pytest.mark.parametrize("family", ["llama_gqa_untied", "opt_350m_shape", "gpt2"])
def test_ppo_iteration_every_family(family, tmp_path, distributed, model_dirs, data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs(family))
    assert trainer.engine.rollout_path == "module"  # hybrid_engine: auto on CPU
    before = _weights(trainer.engine.actor)
    entry = trainer.run()
    after = _weights(trainer.engine.actor)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    (record,) = [r for r in _metrics(tmp_path / "run") if r["step"] == "ppo"]
    assert PPO_METRICS <= set(record)
    assert record["rollout_path"] == "module" and record["iteration"] == 1
    assert record["kl"] == pytest.approx(0.0, abs=1e-5)  # actor == reference at iteration 0
    assert record["rollout_logprob_gap"] < 1e-4
    assert {"heldout", "final_reward", "final_kl", "timings"} <= set(entry)
    for name in ("final", "critic"):
        assert (tmp_path / "run" / "ppo" / name / "config.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ppo"]["rollout_path"] == "module"


def test_zero3_ppo_with_offloaded_reference_and_ema(tmp_path, distributed, model_dirs,
                                                     data_cache, fully_partitioned):
    overrides = {"engine": {"torch": {"actor_zero_stage": 3, "critic_zero_stage": 3}},
                 "ppo": {"offload_reference_model": True, "enable_ema": True,
                         "ema_beta": 0.75}}
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"), overrides)
    engine = trainer.engine
    assert engine.actor.zero_optimization_stage() == 3
    assert all(p.numel() == 0 for p in unwrap_model(engine.actor).parameters())
    assert engine.ref.zero_optimization_stage() == 3  # offloaded by ZeRO-3 param offload
    initial = {k: v.clone() for k, v in engine.ema_state.ema.items()}
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    real = experience.sample_mask > 0
    np.testing.assert_allclose(experience.ref_logprobs[real], experience.logprobs[real], rtol=0,
                               atol=1e-5)
    seen = []  # the actor's weights at each EMA update
    update_ema = engine.update_ema
    engine.update_ema = lambda: (seen.append(engine.actor_weights()), update_ema())
    trainer.train_on_experience([experience], iteration=0)
    # 8 rows in mini-batches of 4, one epoch: two actor steps, an EMA update after each
    assert len(seen) == 2
    expected = {k: 0.75 * (0.75 * v + 0.25 * seen[0][k]) + 0.25 * seen[1][k]
                for k, v in initial.items()}
    actor = engine.actor_weights()
    for key, value in engine.ema_state.ema.items():
        torch.testing.assert_close(value, expected[key])
        torch.testing.assert_close(seen[1][key], actor[key])
    assert any(not torch.equal(seen[0][k], actor[k]) for k in initial)
    trainer.iteration = 1
    entry = trainer._finish(0.0)
    assert "heldout_ema" in entry
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "ema")
    state = saved.state_dict()
    torch.testing.assert_close(state["model.norm.weight"],
                               engine.ema_state.ema["model.norm.weight"])
    for name, kind in (("final", "lm"), ("critic", "value"), ("ema", "lm")):
        assert_export_complete(tmp_path / "run" / "ppo" / name, kind=kind)


def test_reference_offload_below_zero3_keeps_a_cpu_module(tmp_path, distributed, model_dirs,
                                                          data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs("gpt2"),
                       {"ppo": {"offload_reference_model": True}})
    ref = trainer.engine.ref
    assert type(ref).__name__ != "DeepSpeedEngine"
    assert {p.device.type for p in ref.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in ref.parameters())
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    real = experience.sample_mask > 0
    np.testing.assert_allclose(experience.ref_logprobs[real], experience.logprobs[real], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_ptx_modes(mode, tmp_path, distributed, model_dirs, data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_tied"),
                       {"ppo": {"unsup_coef": 0.5, "ptx_mode": mode}})
    assert trainer.ptx_enabled
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    metrics = trainer.train_on_experience([experience], iteration=0)
    assert metrics["ptx_loss"] > 0
    steps = 2  # 8 rollout rows in mini-batches of 4, one PPO epoch
    assert trainer.engine.critic.global_steps == steps
    assert trainer.engine.actor.global_steps == (2 * steps if mode == "separate" else steps)


def test_lora_actor_and_critic(tmp_path, distributed, model_dirs, data_cache):
    lora = {"dim": 4, "alpha": 4.0, "module_name": LORA_MODULE_NAME["opt"],
            "only_optimize": True}
    trainer = _trainer(tmp_path, data_cache, model_dirs("opt_350m_shape"),
                       {"ppo": {"actor": {"lora": lora}, "critic": {"lora": lora}}})
    for engine in (trainer.engine.actor, trainer.engine.critic):
        trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n or ".score." in n for n in trainable)
    trainer.run()
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "final")
    assert not any("lora" in n for n, _ in saved.named_parameters())


def test_short_answers_are_counted_and_masked(tmp_path, distributed, model_dirs, data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"),
                       {"ppo": {"min_answer_tokens": 99}})
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    assert experience.short_answers == 8 and bool(experience.is_short.all())
    assert float(experience.response_mask.sum()) == 0.0
    scored = trainer.with_advantages([experience])
    assert float((np.abs(scored.advantages) * scored.response_mask).sum()) == 0.0
    before = _weights(trainer.engine.actor)
    metrics = trainer.train_on_experience([experience], iteration=0)
    assert metrics["short_answers"] == 8 and metrics["actor_loss"] == 0.0
    after = _weights(trainer.engine.actor)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no loss, no update


def test_dschat_rule_reuses_the_last_valid_rollout(tmp_path, distributed, model_dirs,
                                                   data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"),
                       {"ppo": {"short_answer_policy": "dschat", "min_answer_tokens": 1}})
    first = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                        batch_index=0)
    assert first.short_answers == 0
    trainer.config = trainer.config.replace(
        ppo=dataclasses.replace(trainer.config.ppo, min_answer_tokens=99))
    remembered, trainer.last_valid = trainer.last_valid, None
    with pytest.raises(RuntimeError, match="no earlier valid rollout"):
        trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=1,
                                    batch_index=0)
    trainer.last_valid = remembered
    second = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=1,
                                         batch_index=0)
    assert second.short_answers == 8
    np.testing.assert_array_equal(second.response, first.response)  # reused
    np.testing.assert_array_equal(second.prompt_ids, first.prompt_ids)


def test_hybrid_engine_on_fails_loudly_on_cpu(tmp_path, distributed, model_dirs, data_cache):
    with pytest.raises(RuntimeError, match="Hybrid Engine cannot run on CPU"):
        _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"),
                 {"engine": {"torch": {"hybrid_engine": "on"}}})


def test_ppo_step_is_split_invariant(tmp_path, distributed, model_dirs, data_cache):
    """Mini-batches of 4 with 2 accumulation steps update like mini-batches of 8."""
    weights = {}
    for micro, accumulation in ((8, 1), (4, 2)):
        overrides = {"ppo": {"per_device_training_batch_size": micro,
                             "gradient_accumulation_steps": accumulation,
                             "actor_optim": {"learning_rate": 1e-4},
                             "critic_optim": {"learning_rate": 1e-4}}}
        trainer = _trainer(tmp_path / f"{micro}", data_cache, model_dirs("gpt2"), overrides)
        experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(),
                                                 iteration=0, batch_index=0)
        trainer.train_on_experience([experience], iteration=0)
        weights[micro] = (_weights(trainer.engine.actor), _weights(trainer.engine.critic))
    for one, other in zip(weights[8], weights[4], strict=True):
        diff = max(float((one[n] - other[n]).abs().max()) for n in one)
        assert diff <= 1e-6, diff


def test_reward_model_with_its_own_tokenizer_scores_retokenized_text(
        tmp_path, distributed, model_dirs, data_cache, tokenizer_dir):
    overrides = {"model": {"reward_tokenizer_name_or_path": tokenizer_dir,
                           "retokenize_for_reward": True}}
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"), overrides)
    assert not trainer.engine.reward_reads_actor_tokens
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    assert experience.scores.shape == (8,) and bool(np.isfinite(experience.scores).all())


def test_mismatched_reward_tokenizer_is_an_error(tmp_path, distributed, model_dirs, data_cache,
                                                 tokenizer_dir):
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="retokenize_for_reward"):
        _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"),
                 {"model": {"reward_tokenizer_name_or_path": tokenizer_dir}})


@pytest.mark.parametrize("ppo", [
    {"preset": "deepspeed_chat"},
    {"preset": "nemo"},
    {"conventions": {"kl_in": "loss", "entropy_coef": 0.01, "kl_controller": "adaptive",
                     "kl_horizon": 10.0}},
], ids=["deepspeed_chat", "nemo", "kl_in_loss_entropy_adaptive"])
def test_ppo_iteration_under_other_conventions(ppo, tmp_path, distributed, model_dirs,
                                               data_cache):
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"), {"ppo": ppo})
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch(), iteration=0,
                                             batch_index=0)
    metrics = trainer.train_on_experience([experience], iteration=0)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
    assert all(torch.isfinite(torch.tensor(v)) for v in numbers.values()), numbers
    assert metrics["kl_coef"] == trainer.conventions.kl_coef
    if trainer.conventions.kl_controller == "adaptive":  # KL ~ 0 < target: beta shrinks
        assert trainer.kl_state.kl_coef < trainer.conventions.kl_coef


def test_a_non_finite_step_reaches_no_weight(tmp_path, distributed, model_dirs, data_cache):
    """A NaN advantage makes every actor gradient NaN: the actor engine does not apply the
    step and reports a NaN gradient norm (the loop's guard counts it), its weights stay; the
    critic, whose loss has no advantage in it, trains."""
    trainer = _trainer(tmp_path, data_cache, model_dirs("llama_gqa_untied"))
    experience = trainer.with_advantages([trainer.generate_experience(
        trainer.prompt_iterator.next_batch())])
    micro = [experience.train_arrays(np.arange(trainer.minibatch_rows))]
    micro[0]["advantages"][0, 0] = np.nan
    actor, critic = _weights(trainer.engine.actor), _weights(trainer.engine.critic)
    stats = trainer.train_step(micro, normalizers=[10.0], ptx=None,
                               ptx_normalizers=None, kl_coef=0.1)
    assert np.isnan(stats["actor_grad_norm"]) and np.isfinite(stats["critic_grad_norm"])
    after = _weights(trainer.engine.actor)
    assert all(torch.equal(actor[n], after[n]) for n in actor)
    assert trainer.engine.actor.skipped_steps == 1
    after = _weights(trainer.engine.critic)
    assert any(not torch.equal(critic[n], after[n]) for n in critic)
