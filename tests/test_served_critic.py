"""A PPO run whose critic is served (`rlhf serve critic`, with the reward model and the initial
policy served too, here on threads of the test process) gives the metrics and the actor and
critic weights of the same run in process, on both backends and across them; a run resumed
from a checkpoint with a restarted critic server equals the uninterrupted one. Loopback only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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
COMPARED = ("reward_score", "kl", "actor_loss", "critic_loss", "approx_kl",
            "value_clip_fraction", "critic_grad_norm", "critic_lr", "returns_mean",
            "advantages_mean")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT and reward models of the demo's shape, a few steps each (torch)."""
    from shared.pipeline import run_command
    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed()  # a world of one, as `rlhf` starts the torch backend
    run_dir = tmp_path_factory.mktemp("served-critic-base")
    config = load_config(DEMO, [*TINY, "pipeline_steps=[sft, reward]"])
    summary = run_command("torch", "pipeline", config, run_dir)
    return summary["sft"]["final_model"], summary["reward"]["final_model"]


def _role_handler(backend, role, path, config):
    if backend == "torch":
        from torch_rlhf.serving import TorchRoleHandler as Handler
    else:
        from jax_rlhf.serving import JaxRoleHandler as Handler
    return Handler(role, path, config)


def _critic_handler(backend, path, config, checkpoints):
    from shared.serving.critic_handler import CriticHandler

    if backend == "torch":
        from torch_rlhf.critic import TorchCritic as Critic
    else:
        from jax_rlhf.critic import JaxCritic as Critic
    return CriticHandler(Critic(config, path), checkpoint_dir=checkpoints)


def _ppo(backend, trained, run_dir, overrides=(), *, resume=False):
    from shared.pipeline import run_command

    actor, critic = trained
    config = load_config(DEMO, [*TINY, *overrides])
    summary = run_command(backend, "ppo", config, run_dir, actor=actor, critic=critic,
                          resume=resume)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    entry = summary["ppo"]
    weights = {role: load_file(str(Path(entry[key]) / "model.safetensors"))
               for role, key in (("actor", "final_model"), ("critic", "critic_model"))}
    return entry, [m for m in metrics if m.get("step") == "ppo"], weights


@contextlib.contextmanager
def _scoring_servers(backend, trained, config):
    """Reward model and initial policy servers: their url overrides."""
    from shared.serving import ServerThread

    actor, critic = trained
    with ServerThread(_role_handler(backend, "reward", critic, config)) as reward, \
            ServerThread(_role_handler(backend, "initial-policy", actor, config)) as policy:
        yield [f"ppo.reward_model.url={reward.url}", f"ppo.initial_policy.url={policy.url}"]


def _served_ppo(backend, trained, run_dir, scoring, critic_server, overrides=(),
                resume=False):
    return _ppo(backend, trained, run_dir, [*scoring, f"ppo.critic.url={critic_server.url}",
                                            *overrides], resume=resume)


def _same_run(a, b):
    entry_a, metrics_a, weights_a = a
    entry_b, metrics_b, weights_b = b
    assert len(metrics_a) == len(metrics_b) == 2
    for ma, mb in zip(metrics_a, metrics_b, strict=True):
        for key in COMPARED:
            assert abs(ma[key] - mb[key]) <= METRIC_TOLERANCE * max(1.0, abs(ma[key])), key
    for role in ("actor", "critic"):
        assert weights_a[role].keys() == weights_b[role].keys()
        worst = max(float(np.abs(weights_a[role][k] - weights_b[role][k]).max())
                    for k in weights_a[role])
        assert worst <= WEIGHT_TOLERANCE, (role, worst)
    assert entry_a["heldout"] == pytest.approx(entry_b["heldout"], abs=1e-9)


@pytest.mark.parametrize(("backend", "server_backend"), [
    ("torch", "torch"),
    pytest.param("torch", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "torch", marks=pytest.mark.slow),
])
def test_served_critic_gives_the_in_process_run(trained, tmp_path, backend, server_backend):
    from shared.serving import ServerThread

    config = load_config(DEMO, TINY)
    in_process = _ppo(backend, trained, tmp_path / "in-process")
    handler = _critic_handler(server_backend, trained[1], config, tmp_path / "critic-ckpt")
    with _scoring_servers(server_backend, trained, config) as scoring, \
            ServerThread(handler) as critic:
        served = _served_ppo(backend, trained, tmp_path / "served", scoring, critic)
    _same_run(in_process, served)
    models = served[0]["models"]
    assert models[2] == f"critic@{critic.url}"
    assert handler.step == 2 * 4  # 2 iterations x 2 ppo_epochs x 8 rows / 4 rows a step
    assert Path(served[0]["critic_model"]) == tmp_path / "served" / "ppo" / "critic"


@pytest.mark.slow
def test_resume_with_a_restarted_critic_server_is_exact(trained, tmp_path):
    """Checkpoint at iteration 1; the actor's run and the critic server both lose
    everything after it (the iteration 2 checkpoint is deleted, the server restarts with
    only its checkpoint directory); resuming gives the uninterrupted run."""
    from shared.serving import ServerThread

    config = load_config(DEMO, TINY)
    ckpt = tmp_path / "critic-ckpt"
    run_dir = tmp_path / "resumed"
    with _scoring_servers("torch", trained, config) as scoring:
        with ServerThread(_critic_handler("torch", trained[1], config,
                                          tmp_path / "whole-ckpt")) as critic:
            whole = _served_ppo("torch", trained, tmp_path / "whole", scoring, critic)
        with ServerThread(_critic_handler("torch", trained[1], config, ckpt)) as critic:
            _served_ppo("torch", trained, run_dir, scoring, critic, ["logging.save_interval=1"])
            port = critic.port
        checkpoints = sorted((run_dir / "ppo" / "checkpoints").glob("iter-*"))
        assert [p.name for p in checkpoints] == ["iter-00000001", "iter-00000002"]
        shutil.rmtree(checkpoints[-1])
        restarted = _critic_handler("torch", trained[1], config, ckpt)
        with ServerThread(restarted, port=port) as critic:
            resumed = _served_ppo("torch", trained, run_dir, scoring, critic,
                                  ["logging.save_interval=1"], resume=True)
    assert restarted.step == 8
    _same_run(whole, resumed)


@pytest.mark.slow
def test_torch_and_jax_critic_servers_agree(trained, tmp_path):
    """The same values, and the same train_step statistics and values after it, from the
    two backends' critic handlers on the same requests."""
    config = load_config(DEMO, TINY)
    rng = np.random.default_rng(0)
    rows, prompt, answer, steps = 4, 6, 4, 2
    rollout = {"prompt_ids": rng.integers(3, 17, (rows, prompt)),
               "prompt_mask": np.ones((rows, prompt), np.int64),
               "response": rng.integers(3, 17, (rows, answer)),
               "sample_mask": np.ones((rows, answer), np.int64)}
    rollout["prompt_mask"][0, :2] = 0
    rollout["prompt_ids"][0, :2] = 0
    rollout["sample_mask"][1, 2:] = 0
    # one micro-batch a step: the demo's ppo.gradient_accumulation_steps
    train = {k: v[None] for k, v in rollout.items()}
    train.update(values=rng.normal(size=(1, rows, answer)).astype(np.float32),
                 returns=rng.normal(size=(1, rows, answer)).astype(np.float32),
                 response_mask=rollout["sample_mask"][None].astype(np.float32))
    answers = {}
    for backend in ("torch", "jax"):
        handler = _critic_handler(backend, trained[1], config, tmp_path / backend)
        before = handler.call("values", dict(rollout), {})["values"]
        stats = [handler.call("train_step", dict(train),
                              {"step": s, "normalizers": [14.0]}) for s in range(steps)]
        after = handler.call("values", dict(rollout), {})["values"]
        answers[backend] = before, stats, after
    (tb, ts, ta), (jb, js, ja) = answers["torch"], answers["jax"]
    np.testing.assert_allclose(tb, jb, atol=2e-5)
    for a, b in zip(ts, js, strict=True):
        for key in ("critic_loss", "value_clip_fraction", "critic_lr", "critic_grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=2e-5), key
    np.testing.assert_allclose(ta, ja, atol=1e-4)
