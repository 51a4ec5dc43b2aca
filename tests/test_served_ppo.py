"""A PPO run whose reward model and initial policy are served (`rlhf serve`, here on threads of
the test process) gives the metrics and weights of the same run in process, on both backends
and across them (a torch actor with JAX servers, and the reverse). Loopback only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from shared.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ["sft.max_steps=4", "reward.max_steps=4", "sft.per_device_train_batch_size=8",
        "reward.per_device_train_batch_size=8", "ppo.per_device_generation_batch_size=8",
        "ppo.per_device_training_batch_size=4", "ppo.max_iterations=2", "ppo.unsup_coef=0",
        "eval.max_prompts=8", "eval.samples_per_prompt=1", "logging.progress_bar=false",
        "logging.plots=false"]
METRIC_TOLERANCE = 2e-5  # parity_tests/tolerances.py: whole PPO iterations, fp32
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT and reward models of the demo's shape, a few steps each (torch)."""
    from shared.pipeline import run_command
    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed()  # a world of one, as `rlhf` starts the torch backend
    run_dir = tmp_path_factory.mktemp("served-base")
    config = load_config(DEMO, [*TINY, "pipeline_steps=[sft, reward]"])
    summary = run_command("torch", "pipeline", config, run_dir)
    return summary["sft"]["final_model"], summary["reward"]["final_model"]


def _handler(backend, role, path, config):
    if backend == "torch":
        from torch_rlhf.serving import TorchRoleHandler as Handler
    else:
        from jax_rlhf.serving import JaxRoleHandler as Handler
    return Handler(role, path, config)


def _ppo(backend, trained, run_dir, overrides=()):
    from shared.pipeline import run_command

    actor, critic = trained
    config = load_config(DEMO, [*TINY, *overrides])
    summary = run_command(backend, "ppo", config, run_dir, actor=actor, critic=critic)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(Path(summary["ppo"]["final_model"]) / "model.safetensors"))
    return summary["ppo"], [m for m in metrics if m.get("step") == "ppo"], weights


def _served_ppo(backend, server_backend, trained, run_dir):
    from shared.serving import ServerThread

    actor, critic = trained
    config = load_config(DEMO, TINY)
    with ServerThread(_handler(server_backend, "reward", critic, config)) as reward, \
            ServerThread(_handler(server_backend, "initial-policy", actor, config)) as policy:
        return _ppo(backend, trained, run_dir, [f"ppo.reward_model.url={reward.url}",
                                                f"ppo.initial_policy.url={policy.url}"])


def _same_run(a, b):
    entry_a, metrics_a, weights_a = a
    entry_b, metrics_b, weights_b = b
    assert len(metrics_a) == len(metrics_b) == 2
    for ma, mb in zip(metrics_a, metrics_b, strict=True):
        for key in ("reward_score", "kl", "actor_loss", "critic_loss", "approx_kl"):
            assert abs(ma[key] - mb[key]) <= METRIC_TOLERANCE * max(1.0, abs(ma[key])), key
    assert weights_a.keys() == weights_b.keys()
    worst = max(float(np.abs(weights_a[k] - weights_b[k]).max()) for k in weights_a)
    assert worst <= WEIGHT_TOLERANCE, worst
    assert entry_a["heldout"] == pytest.approx(entry_b["heldout"], abs=1e-9)


@pytest.mark.parametrize(("backend", "server_backend"), [
    ("torch", "torch"),
    pytest.param("torch", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "torch", marks=pytest.mark.slow),
])
def test_served_reward_and_initial_policy_give_the_in_process_run(
        trained, tmp_path, backend, server_backend):
    in_process = _ppo(backend, trained, tmp_path / "in-process")
    served = _served_ppo(backend, server_backend, trained, tmp_path / "served")
    _same_run(in_process, served)
    models = served[0]["models"]
    assert models[0] == "actor" and models[1].startswith("reference@http://127.0.0.1:")
    assert any(m.startswith("reward_model@http://127.0.0.1:") for m in models)
    assert in_process[0]["models"] == ["actor", "reference", "critic", "reward_model"]
