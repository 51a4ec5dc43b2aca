"""`rlhf pipeline` with `pipeline_steps: [sft, dpo]` on the JAX backend: the DPO policy starts
from the SFT model, logs TRL's metric names with log 2 at the first step, resumes from its
checkpoint with the reference log-probs it saved, and exports a policy transformers loads."""

import json
import math

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from shared.cli import main as rlhf
from shared.dpo_step import METRIC_KEYS

DPO = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 64,
       "gradient_accumulation_steps": 2, "max_steps": 3, "beta": 0.5,
       "optim": {"learning_rate": 1e-2, "lr_scheduler_type": "constant"}}


def _records(run_dir, step="dpo"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k != "time"}
            for r in map(json.loads, lines) if r["step"] == step]


@pytest.fixture(scope="module")
def dpo_run(tiny_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    config = tiny_config(pipeline_steps=["sft", "dpo"], dpo=DPO,
                         logging={"save_interval": 2})
    assert rlhf(["pipeline", "--backend", "jax", "--config", str(config),
                 "--run-dir", str(run_dir)]) == 0
    return run_dir, config


def test_sft_then_dpo_pipeline(dpo_run):
    run_dir, _ = dpo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= {"sft", "dpo"} and "reward" not in summary
    entry = summary["dpo"]
    assert entry["steps"] == 3 and "heldout" in entry
    assert {f"eval_{k}" for k in ("loss", *METRIC_KEYS)} <= set(entry)
    records = [r for r in _records(run_dir) if "loss" in r]
    assert {"loss", "lr", "grad_norm", "skipped_steps", *METRIC_KEYS} <= set(records[0])
    assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy = reference
    start = load_file(run_dir / "sft" / "final" / "model.safetensors")
    final = run_dir / "dpo" / "final"
    trained = load_file(final / "model.safetensors")
    assert f"base model: `{run_dir / 'sft' / 'final'}`" in (final / "README.md").read_text()
    assert any(not np.array_equal(start[k], trained[k]) for k in start)
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    ids = tokenizer("1+2=", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_resumed_dpo_step_matches(dpo_run, tmp_path):
    """`rlhf dpo --resume` from the checkpoint of step 2 (its loop state holds the reference
    log-probs of the starting policy) logs step 3 and ends with the weights of the run."""
    import shutil

    run_dir, config = dpo_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "dpo" / "final")
    shutil.rmtree(resumed / "dpo" / "checkpoints" / "step-00000003")
    summary = json.loads((resumed / "summary.json").read_text())
    summary.pop("dpo")
    (resumed / "summary.json").write_text(json.dumps(summary))
    assert rlhf(["dpo", "--backend", "jax", "--config", str(config), "--run-dir",
                 str(resumed), "--resume"]) == 0
    assert _records(resumed) == _records(run_dir)
    want = load_file(run_dir / "dpo" / "final" / "model.safetensors")
    have = load_file(resumed / "dpo" / "final" / "model.safetensors")
    assert all(np.array_equal(want[k], have[k]) for k in want)
