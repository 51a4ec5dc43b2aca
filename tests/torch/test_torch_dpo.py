"""`rlhf dpo` on the torch backend: the command from an SFT model (summary entry, TRL's metric
names, log 2 at the first step, an exported policy transformers loads and generates with), a
killed run resumed row for row, and micro-batch accumulation leaving the step unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rlhf_configs import family_models, merge, write_config
from safetensors.torch import load_file

from shared.cli import main as rlhf
from shared.dpo_step import METRIC_KEYS
from torch_rlhf.dpo import DPOTrainer
from torch_rlhf.supervised import SupervisedTrainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

DPO = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 64,
       "gradient_accumulation_steps": 2, "max_steps": 3, "beta": 0.5,
       "optim": {"learning_rate": 1e-2, "lr_scheduler_type": "constant"}}


class Killed(Exception):
    """Stands for the process dying."""


def _records(run_dir, step="dpo") -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        if record["step"] == step:
            out.append({k: v for k, v in record.items()
                        if k != "time" and not k.endswith("_time")})
    return out


def test_rlhf_dpo_trains_from_the_sft_model(tmp_path, distributed, model_dirs, data_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = model_dirs("llama_gqa_untied")
    path, _ = write_config(tmp_path, merge(family_models(actor), {
        "data": {"cache_dir": data_cache}, "dpo": DPO}))
    run_dir = tmp_path / "run"
    assert rlhf(["dpo", "--backend", "torch", "--config", str(path), "--actor", actor,
                 "--run-dir", str(run_dir)]) == 0

    entry = json.loads((run_dir / "summary.json").read_text())["dpo"]
    assert entry["steps"] == 3 and "heldout" in entry
    assert {f"eval_{k}" for k in ("loss", *METRIC_KEYS)} <= set(entry)
    records = [r for r in _records(run_dir) if "loss" in r]
    assert len(records) == 3
    assert {"loss", "lr", "grad_norm", "skipped_steps", *METRIC_KEYS} <= set(records[0])
    # step 1: the policy is its reference (log-probs equal up to float32 rounding)
    assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)

    final = run_dir / "dpo" / "final"
    assert f"base model: `{actor}`" in (final / "README.md").read_text()
    start, trained = load_file(f"{actor}/model.safetensors"), load_file(
        final / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("1+2=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_killed_dpo_resumes_row_for_row(tmp_path, distributed, model_dirs, data_cache,
                                        monkeypatch):
    overrides = merge(family_models(model_dirs("llama_gqa_untied")), {
        "data": {"cache_dir": data_cache}, "eval": {"metric": "none"},
        "logging": {"save_interval": 2, "keep_checkpoints": 1},
        "dpo": {**DPO, "max_steps": 5, "eval_interval": 2, "gradient_accumulation_steps": 1}})
    _, config = write_config(tmp_path, overrides)
    uninterrupted = tmp_path / "uninterrupted"
    DPOTrainer(config, run_dir=uninterrupted).run()

    resumed = tmp_path / "resumed"
    original, calls = SupervisedTrainer.train_step, {"n": 0}

    def dies_in_step_4(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return original(self, batch)

    with monkeypatch.context() as patch:  # the checkpoint of step 2 holds the reference
        patch.setattr(SupervisedTrainer, "train_step", dies_in_step_4)
        with pytest.raises(Killed):
            DPOTrainer(config, run_dir=resumed).run()
    assert (resumed / "dpo" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    DPOTrainer(config, run_dir=resumed).run(resume=True)

    assert _records(resumed) == _records(uninterrupted)  # bit for bit
    want = load_file(uninterrupted / "dpo" / "final" / "model.safetensors")
    have = load_file(resumed / "dpo" / "final" / "model.safetensors")
    assert all(torch.equal(want[k], have[k]) for k in want)


def test_accumulation_does_not_change_the_step(tmp_path, distributed, model_dirs, data_cache):
    """One step on 8 pairs: 1 micro-batch of 8 or 2 of 4 (the loss divided by the step's
    pair count either way) give the same loss, statistics and weights."""
    results = []
    for micro, accumulation in ((8, 1), (4, 2)):
        overrides = merge(family_models(model_dirs("llama_gqa_untied")), {
            "data": {"cache_dir": data_cache}, "eval": {"metric": "none"},
            "dpo": {**DPO, "per_device_train_batch_size": micro,
                    "gradient_accumulation_steps": accumulation}})
        _, config = write_config(tmp_path / f"m{micro}", overrides)
        trainer = DPOTrainer(config, run_dir=tmp_path / f"m{micro}" / "run")
        trainer.loop.compute_reference(trainer)
        trainer.train_step(trainer.iterator.next_batch())  # policy = reference: log 2
        metrics = trainer.train_step(trainer.iterator.next_batch())
        weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        results.append((metrics, weights))
    (one, w_one), (two, w_two) = results
    for key in ("loss", *METRIC_KEYS):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    # Adam divides by each entry's own RMS: entries whose gradient nearly cancels move by up
    # to ~lr in a rounding-driven direction (parity level 4); lr 1e-2 moves the rest
    for name, value in w_one.items():
        torch.testing.assert_close(w_two[name], value, rtol=1e-4, atol=1e-4)
