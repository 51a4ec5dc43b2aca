"""Resume: a step (SFT, reward model) killed after a checkpoint and resumed writes
metrics.jsonl row for row as an uninterrupted run, bit for bit, and ends with the same
weights; so does a pipeline killed mid-SFT and again mid-PPO."""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_configs import family_models, merge, write_config
from safetensors.torch import load_file

from shared.pipeline import run_pipeline
from torch_rlhf.ppo import PPOTrainer
from torch_rlhf.reward import RewardTrainer
from torch_rlhf.sft import SFTTrainer
from torch_rlhf.supervised import SupervisedTrainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


class Killed(Exception):
    """Stands for the process dying."""


def _fail_on_call(monkeypatch, cls, name: str, call: int) -> None:
    original = getattr(cls, name)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed(f"{cls.__name__}.{name} call {call}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def _records(run_dir) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k != "time" and not k.endswith("_time")})
    return out


def _same_weights(a, b, name: str) -> None:
    want = load_file(a / name / "model.safetensors")
    have = load_file(b / name / "model.safetensors")
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want), name


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, RewardTrainer], ids=["sft", "reward"])
def test_killed_step_resumes_row_for_row(trainer_cls, tmp_path, distributed, model_dirs,
                                         data_cache, monkeypatch):
    step = trainer_cls.step
    overrides = merge(family_models(model_dirs("llama_gqa_untied")), {
        "data": {"cache_dir": data_cache},
        "eval": {"metric": "none"},
        "logging": {"save_interval": 2, "keep_checkpoints": 1},
        step: {"max_steps": 5, "eval_interval": 2},
    })
    _, config = write_config(tmp_path, overrides)
    uninterrupted = tmp_path / "uninterrupted"
    trainer_cls(config, run_dir=uninterrupted).run()

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:  # dies in step 4, after the checkpoint of step 2
        _fail_on_call(patch, SupervisedTrainer, "train_step", 4)
        with pytest.raises(Killed):
            trainer_cls(config, run_dir=resumed).run()
    assert (resumed / step / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert [r["iteration"] for r in _records(resumed)] == [1, 2, 2, 3]
    entry = trainer_cls(config, run_dir=resumed).run(resume=True)

    expected = _records(uninterrupted)
    assert [r["iteration"] for r in expected] == [1, 2, 2, 3, 4, 4, 5, 5]
    assert _records(resumed) == expected  # every logged value, bit for bit
    _same_weights(uninterrupted, resumed, f"{step}/final")
    reference = json.loads((uninterrupted / "summary.json").read_text())[step]
    assert set(entry) == set(reference)
    assert {k: v for k, v in entry.items() if k not in ("timings", "final_model")} == {
        k: v for k, v in reference.items() if k not in ("timings", "final_model")}


def test_killed_pipeline_resumes_bitwise(tmp_path, distributed, model_dirs, data_cache,
                                         monkeypatch):
    overrides = merge(family_models(model_dirs("llama_gqa_untied")), {
        "data": {"cache_dir": data_cache},
        "logging": {"save_interval": 2, "keep_checkpoints": 1},
        "sft": {"max_steps": 5},
        "reward": {"max_steps": 2},
        "ppo": {"max_iterations": 4, "ppo_epochs": 2, "generation_batches": 2,
                "enable_ema": True, "unsup_coef": 0.5,
                "short_answer_policy": "dschat"},
    })
    _, config = write_config(tmp_path, overrides)
    uninterrupted = tmp_path / "uninterrupted"
    run_pipeline("torch", config, uninterrupted)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:  # dies in SFT step 4 (checkpoint at step 2)
        _fail_on_call(patch, SupervisedTrainer, "train_step", 4)
        with pytest.raises(Killed):
            run_pipeline("torch", config, resumed)
    assert (resumed / "sft" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    with monkeypatch.context() as patch:  # dies in PPO iteration 4 (checkpoint at 2)
        _fail_on_call(patch, PPOTrainer, "train_on_experience", 4)
        with pytest.raises(Killed):
            run_pipeline("torch", config, resumed, resume=True)
    assert (resumed / "ppo" / "checkpoints" / "iter-00000002" / "COMPLETE").is_file()
    run_pipeline("torch", config, resumed, resume=True)

    expected, got = _records(uninterrupted), _records(resumed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert got == expected  # every logged loss and statistic, bit for bit
    for name in ("sft/final", "reward/final", "ppo/final", "ppo/critic", "ppo/ema"):
        _same_weights(uninterrupted, resumed, name)
    summary = json.loads((resumed / "summary.json").read_text())
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["ppo"]["heldout"] == reference["ppo"]["heldout"]
    assert summary["ppo"]["final_reward"] == reference["ppo"]["final_reward"]
