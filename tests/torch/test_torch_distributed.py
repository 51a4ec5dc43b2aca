"""Scale-out: two processes with ZeRO-3 (gloo) follow the loss trajectory of one process on
the same global batches (SFT steps and a PPO iteration), under torchrun and (slow) the
DeepSpeed launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rlhf_configs import REPO_ROOT, family_models, merge, write_config

from shared.pipeline import run_pipeline

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

LOSSES = {"sft": ("loss", "grad_norm", "eval_loss"),
          "ppo": ("actor_loss", "critic_loss", "pg_loss", "reward_score", "kl", "entropy",
                  "advantages_mean", "returns_mean", "ptx_loss")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(model_dir: str, data_cache: str, per_device: dict) -> dict:
    return merge(family_models(model_dir), {
        "pipeline_steps": ["sft", "ppo"],
        "data": {"cache_dir": data_cache},
        "engine": {"torch": {"zero_stage": 3, "actor_zero_stage": 3, "critic_zero_stage": 3}},
        "sft": {"max_steps": 3, "per_device_train_batch_size": per_device["sft"],
                "per_device_eval_batch_size": per_device["sft"],
                "optim": {"num_warmup_steps": 0}},
        "ppo": {"unsup_coef": 0.5, "per_device_generation_batch_size": per_device["generation"],
                "per_device_training_batch_size": per_device["training"]},
        "eval": {"max_prompts": 6},
    })


def _trajectory(run_dir) -> dict[tuple[str, int, str], float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        for key in LOSSES[record["step"]]:
            if key in record:
                out[(record["step"], record["iteration"], key)] = record[key]
    return out


def _launcher(name: str) -> list[str]:
    port = str(_free_port())
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", port, "-m"]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", "2", "--master_port", port, "--no_local_rank",
            "--module"]


@pytest.mark.parametrize("launcher", ["torchrun",
                                      pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_two_process_zero3_matches_one_process(launcher, tmp_path, distributed, model_dirs,
                                               data_cache):
    model_dir = model_dirs("llama_gqa_untied")
    path, _ = write_config(tmp_path / "two", _overrides(
        model_dir, data_cache, {"sft": 4, "generation": 4, "training": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [*_launcher(launcher), "shared.cli", "pipeline", "--config", str(path),
               "--run-dir", str(tmp_path / "two" / "run")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    _, single = write_config(tmp_path / "one", _overrides(
        model_dir, data_cache, {"sft": 8, "generation": 8, "training": 4}))
    run_pipeline("torch", single, tmp_path / "one" / "run")

    two, one = _trajectory(tmp_path / "two" / "run"), _trajectory(tmp_path / "one" / "run")
    assert two.keys() == one.keys()
    assert {step for step, _, _ in one} == {"sft", "ppo"}
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
