"""What the served-role tests share (test_served_ppo, test_served_critic, test_served_faults,
test_served_text_reward): the demo's PPO step cut to two iterations, run on the tiny random
models of tests/conftest.py's ``served_models``; a run's metrics and exported weights; and the
check that two runs are the same run, to parity_tests/tolerances.py's fp32 whole-iteration
tolerances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from safetensors.numpy import load_file

from shared.config import load_config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TINY = ["ppo.per_device_generation_batch_size=8", "ppo.per_device_training_batch_size=4",
        "ppo.max_iterations=2", "ppo.unsup_coef=0", "eval.max_prompts=8",
        "eval.samples_per_prompt=1", "logging.progress_bar=false", "logging.plots=false"]
METRIC_TOLERANCE = 2e-5  # parity_tests/tolerances.py: whole PPO iterations, fp32
WEIGHT_TOLERANCE = 1e-5
COMPARED = ("reward_score", "kl", "actor_loss", "critic_loss", "approx_kl")


class Run(NamedTuple):
    entry: dict[str, Any]  # the run summary's "ppo" entry
    metrics: list[dict[str, Any]]  # its metrics.jsonl lines of the PPO step
    weights: dict[str, dict[str, np.ndarray]]  # "actor" and "critic": exported weights


def config(*overrides: str):
    return load_config(DEMO, [*TINY, *overrides])


def ppo_lines(run_dir: Path) -> list[dict[str, Any]]:
    """The PPO step's metrics.jsonl lines ([] when the run wrote none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [m for m in map(json.loads, lines) if m.get("step") == "ppo"]


def role_handler(backend: str, role: str, path: str, run_config):
    """The ``rlhf serve <role>`` handler of ``backend`` for the model at ``path``."""
    if backend == "torch":
        from torch_rlhf.serving import TorchRoleHandler as Handler
    else:
        from jax_rlhf.serving import JaxRoleHandler as Handler
    return Handler(role, path, run_config)


def run_ppo(backend: str, models: dict[str, str], run_dir: Path, overrides=(), *,
            run_config=None, resume: bool = False) -> Run:
    """The PPO step on ``models`` (policy as actor and reference, reward as critic and reward
    model)."""
    from shared.pipeline import run_command

    if backend == "torch":
        from torch_rlhf.deepspeed_config import init_distributed

        init_distributed()  # a world of one, as `rlhf` starts the torch backend
    summary = run_command(backend, "ppo", run_config or config(*overrides), run_dir,
                          actor=models["policy"], critic=models["reward"], resume=resume)
    return read_run(run_dir, summary["ppo"])


def read_run(run_dir: Path, entry: dict[str, Any] | None = None) -> Run:
    """The PPO step of ``run_dir`` (``entry``: its summary entry; read from summary.json
    when None)."""
    if entry is None:
        entry = json.loads((run_dir / "summary.json").read_text())["ppo"]
    weights = {role: load_file(str(Path(entry[key]) / "model.safetensors"))
               for role, key in (("actor", "final_model"), ("critic", "critic_model"))
               if key in entry}
    return Run(entry, ppo_lines(run_dir), weights)


def assert_same_run(a: Run, b: Run, compared=COMPARED) -> None:
    """Two iterations each, the same metrics, weights and held-out evaluation."""
    assert len(a.metrics) == len(b.metrics) == 2
    for ma, mb in zip(a.metrics, b.metrics, strict=True):
        for key in compared:
            assert abs(ma[key] - mb[key]) <= METRIC_TOLERANCE * max(1.0, abs(ma[key])), key
    assert a.weights.keys() == b.weights.keys()
    for role in a.weights:
        assert a.weights[role].keys() == b.weights[role].keys(), role
        worst = max(float(np.abs(a.weights[role][k] - b.weights[role][k]).max())
                    for k in a.weights[role])
        assert worst <= WEIGHT_TOLERANCE, (role, worst)
    assert a.entry["heldout"] == pytest.approx(b.entry["heldout"], abs=1e-9)
