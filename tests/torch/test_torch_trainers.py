"""Steps 1 and 2 on real DeepSpeed engines: every family, every reward loss, LoRA, every
ZeRO stage, split invariance, the shared LR schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from export_checks import assert_export_complete
from rlhf_configs import family_models, merge, write_config
from tiny_hf import LORA_MODULE_NAME

from shared.schedules import make_schedule
from torch_rlhf.optim import lr_scheduler, param_groups
from torch_rlhf.reward import RewardTrainer
from torch_rlhf.saving import gather_params_for
from torch_rlhf.sft import SFTTrainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

FAMILY_NAMES = ["llama_gqa_untied", "opt_350m_shape", "gpt2"]


def _config(tmp_path, data_cache, overrides=None):
    base = {"data": {"cache_dir": data_cache}}
    return write_config(tmp_path, merge(base, overrides or {}))[1]


def _params(engine) -> dict[str, torch.Tensor]:
    with gather_params_for(engine):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_step_every_family(family, tmp_path, distributed, model_dirs, data_cache):
    config = _config(tmp_path, data_cache, family_models(model_dirs(family)))
    trainer = SFTTrainer(config, run_dir=tmp_path / "run")
    before = _params(trainer.engine)
    entry = trainer.run()
    after = _params(trainer.engine)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert math.isfinite(entry["eval_loss"])
    assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]))
    assert "arithmetic_accuracy" in entry["heldout"]
    assert_export_complete(tmp_path / "run" / "sft" / "final", kind="lm")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {r["step"] for r in records} == {"sft"}
    train = [r for r in records if "loss" in r]
    assert len(train) == 2 and {"loss", "lr", "grad_norm", "tokens"} <= set(train[0])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == "torch" and "heldout" in summary["sft"]


def test_accumulation_and_micro_batch_do_not_change_the_step(tmp_path, distributed, model_dirs,
                                                           data_cache):
    """One optimiser step of 4 rows x 2 accumulation steps equals 8 rows x 1."""
    results = {}
    for micro, accumulation in ((8, 1), (4, 2)):
        overrides = family_models(model_dirs("llama_gqa_untied"))
        overrides["sft"] = {"per_device_train_batch_size": micro,
                            "gradient_accumulation_steps": accumulation, "max_steps": 1,
                            "optim": {"learning_rate": 1e-4, "lr_scheduler_type": "constant"}}
        config = _config(tmp_path / f"{micro}x{accumulation}", data_cache, overrides)
        trainer = SFTTrainer(config, run_dir=tmp_path / f"run{micro}")
        metrics = trainer.train_step(trainer.iterator.next_batch())
        results[micro] = (metrics, _params(trainer.engine))
    (m8, p8), (m4, p4) = results[8], results[4]
    assert m8["tokens"] == m4["tokens"]
    assert m8["loss"] == pytest.approx(m4["loss"], abs=1e-6)
    assert m8["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    diff = max(float((p8[n] - p4[n]).abs().max()) for n in p8)
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sft_every_zero_stage(stage, tmp_path, distributed, model_dirs, data_cache):
    overrides = family_models(model_dirs("llama_gqa_tied"))
    overrides["engine"] = {"torch": {"zero_stage": stage}}
    overrides["eval"] = {"metric": "none"}
    config = _config(tmp_path, data_cache, overrides)
    trainer = SFTTrainer(config, run_dir=tmp_path / "run")
    assert trainer.engine.zero_optimization_stage() == stage
    first = trainer.train_step(trainer.iterator.next_batch())
    second = trainer.train_step(trainer.iterator.next_batch())
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert first["grad_norm"] is not None and first["grad_norm"] > 0


def test_zero_stage_does_not_change_the_updates(tmp_path, distributed, model_dirs, data_cache):
    """Two SFT steps give the same losses and parameters under ZeRO 0, 2 and 3 (fp32)."""
    results = {}
    for stage in (0, 2, 3):
        overrides = family_models(model_dirs("llama_gqa_untied"))
        overrides["engine"] = {"torch": {"zero_stage": stage}}
        overrides["eval"] = {"metric": "none"}
        overrides["sft"] = {"optim": {"learning_rate": 1e-3, "lr_scheduler_type": "constant"}}
        config = _config(tmp_path / f"z{stage}", data_cache, overrides)
        trainer = SFTTrainer(config, run_dir=tmp_path / f"run{stage}")
        losses = [trainer.train_step(trainer.iterator.next_batch())["loss"] for _ in range(2)]
        results[stage] = (losses, _params(trainer.engine))
    losses0, params0 = results[0]
    for stage in (2, 3):
        losses, params = results[stage]
        assert losses == pytest.approx(losses0, abs=1e-6), stage
        diff = max(float((params[n] - params0[n]).abs().max()) for n in params0)
        assert diff <= 1e-6, (stage, diff)


def test_lora_sft_trains_only_adapters_and_saves_merged(tmp_path, distributed, model_dirs,
                                                        data_cache):
    overrides = family_models(model_dirs("opt_350m_shape"))
    overrides["sft"] = {"model": {"lora": {"dim": 4, "alpha": 8.0, "only_optimize": True,
                                           "module_name": LORA_MODULE_NAME["opt"],
                                           "learning_rate": 5e-3}}}
    config = _config(tmp_path, data_cache, overrides)
    trainer = SFTTrainer(config, run_dir=tmp_path / "run")
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert [g["initial_lr"] for g in trainer.engine.optimizer.param_groups] == [5e-3]
    before = _params(trainer.engine)
    trainer.run()
    after = _params(trainer.engine)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft" / "final")
    assert not any("lora" in n for n, _ in saved.named_parameters())


@pytest.mark.parametrize("loss,extra", [("bradley_terry", {"margin": 0.5}), ("dschat", {}),
                                        ("kway", {})])
def test_reward_every_loss(loss, extra, tmp_path, distributed, model_dirs, data_cache):
    overrides = family_models(model_dirs("gpt2"))
    overrides["reward"] = {"loss": loss, **extra}
    config = _config(tmp_path, data_cache, overrides)
    trainer = RewardTrainer(config, run_dir=tmp_path / "run")
    entry = trainer.run()
    assert {"eval_accuracy", "eval_chosen_score", "eval_rejected_score"} <= set(entry)
    assert 0.0 <= entry["eval_accuracy"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "loss" in r]
    assert {"loss", "accuracy", "chosen_score", "rejected_score", "lr"} <= set(train[-1])
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "reward" /
                                                               "final")
    assert saved.config.num_labels == 1
    assert_export_complete(tmp_path / "run" / "reward" / "final", kind="value")


def test_lr_follows_the_shared_schedule():
    model = torch.nn.Linear(3, 2)
    from shared.config import OptimizerConfig

    optim = OptimizerConfig(learning_rate=0.1, lr_scheduler_type="cosine", num_warmup_steps=3,
                            min_lr_ratio=0.1)
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=0.1)
    scheduler = lr_scheduler(opt, optim, total_steps=10)
    expected = make_schedule("cosine", base_lr=0.1, warmup_steps=3, total_steps=10,
                             min_lr_ratio=0.1)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    np.testing.assert_allclose(got, [expected(s) for s in range(10)], rtol=1e-12)


def test_param_groups_follow_dschat():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(3, 3))
    model.add_module("norm", torch.nn.LayerNorm(3))
    groups = param_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and decayed == {id(model.proj.weight)}
    assert groups[-1]["weight_decay"] == 0.0 and len(groups[-1]["params"]) == 3



def test_train_on_prompt_adds_prompt_tokens_to_the_loss(tmp_path, distributed, model_dirs,
                                                        data_cache):
    tokens = {}
    for flag in (False, True):
        overrides = merge(family_models(model_dirs("gpt2")),
                          {"data": {"train_on_prompt": flag}, "eval": {"metric": "none"}})
        config = _config(tmp_path / str(flag), data_cache, overrides)
        trainer = SFTTrainer(config, run_dir=tmp_path / f"run{flag}")
        tokens[flag] = trainer.train_step(trainer.iterator.next_batch())["tokens"]
    assert tokens[True] > tokens[False] > 0
