"""A PPO run whose critic is served (`rlhf serve critic`, with the reward model and the initial
policy served too, here on threads of the test process) gives the metrics and the actor and
critic weights of the same run in process, on both backends and across them; a run resumed
from a checkpoint with a restarted critic server equals the uninterrupted one. Loopback only.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from served_runs import COMPARED, assert_same_run, config, role_handler, run_ppo

# the critic's own statistics too
CRITIC_COMPARED = (*COMPARED, "value_clip_fraction", "critic_grad_norm", "critic_lr",
                   "returns_mean", "advantages_mean")


def _critic_handler(backend, path, run_config, checkpoints):
    from shared.serving.critic_handler import CriticHandler

    if backend == "torch":
        from torch_rlhf.critic import TorchCritic as Critic
    else:
        from jax_rlhf.critic import JaxCritic as Critic
    return CriticHandler(Critic(run_config, path), checkpoint_dir=checkpoints)


@contextlib.contextmanager
def _scoring_servers(backend, models, run_config):
    """Reward model and initial policy servers: their url overrides."""
    from shared.serving import ServerThread

    with ServerThread(role_handler(backend, "reward", models["reward"], run_config)) as reward, \
            ServerThread(role_handler(backend, "initial-policy", models["policy"],
                                      run_config)) as policy:
        yield [f"ppo.reward_model.url={reward.url}", f"ppo.initial_policy.url={policy.url}"]


def _served_ppo(backend, models, run_dir, scoring, critic_server, overrides=(), resume=False):
    return run_ppo(backend, models, run_dir, [*scoring, f"ppo.critic.url={critic_server.url}",
                                              *overrides], resume=resume)


@pytest.mark.parametrize(("backend", "server_backend"), [
    ("torch", "torch"),
    pytest.param("torch", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "torch", marks=pytest.mark.slow),
])
def test_served_critic_gives_the_in_process_run(served_models, in_process_ppo, tmp_path,
                                                backend, server_backend):
    from shared.serving import ServerThread

    run_config = config()
    handler = _critic_handler(server_backend, served_models["reward"], run_config,
                              tmp_path / "critic-ckpt")
    with _scoring_servers(server_backend, served_models, run_config) as scoring, \
            ServerThread(handler) as critic:
        served = _served_ppo(backend, served_models, tmp_path / "served", scoring, critic)
    assert_same_run(in_process_ppo(backend), served, CRITIC_COMPARED)
    assert served.weights.keys() == {"actor", "critic"}
    assert served.entry["models"][2] == f"critic@{critic.url}"
    assert handler.step == 2 * 4  # 2 iterations x 2 ppo_epochs x 8 rows / 4 rows a step
    assert Path(served.entry["critic_model"]) == tmp_path / "served" / "ppo" / "critic"


@pytest.mark.slow
def test_resume_with_a_restarted_critic_server_is_exact(served_models, tmp_path):
    """Checkpoint at iteration 1; the actor's run and the critic server both lose
    everything after it (the iteration 2 checkpoint is deleted, the server restarts with
    only its checkpoint directory); resuming gives the uninterrupted run."""
    from shared.serving import ServerThread

    run_config, models = config(), served_models
    ckpt = tmp_path / "critic-ckpt"
    run_dir = tmp_path / "resumed"
    with _scoring_servers("torch", models, run_config) as scoring:
        with ServerThread(_critic_handler("torch", models["reward"], run_config,
                                          tmp_path / "whole-ckpt")) as critic:
            whole = _served_ppo("torch", models, tmp_path / "whole", scoring, critic)
        with ServerThread(_critic_handler("torch", models["reward"], run_config,
                                          ckpt)) as critic:
            _served_ppo("torch", models, run_dir, scoring, critic, ["logging.save_interval=1"])
            port = critic.port
        checkpoints = sorted((run_dir / "ppo" / "checkpoints").glob("iter-*"))
        assert [p.name for p in checkpoints] == ["iter-00000001", "iter-00000002"]
        shutil.rmtree(checkpoints[-1])
        restarted = _critic_handler("torch", models["reward"], run_config, ckpt)
        with ServerThread(restarted, port=port) as critic:
            resumed = _served_ppo("torch", models, run_dir, scoring, critic,
                                  ["logging.save_interval=1"], resume=True)
    assert restarted.step == 8
    assert_same_run(whole, resumed, CRITIC_COMPARED)


@pytest.mark.slow
def test_torch_and_jax_critic_servers_agree(served_models, tmp_path):
    """The same values, and the same train_step statistics and values after it, from the
    two backends' critic handlers on the same requests."""
    run_config = config()
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
        handler = _critic_handler(backend, served_models["reward"], run_config,
                                  tmp_path / backend)
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
