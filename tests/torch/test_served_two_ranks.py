"""Served roles with an actor on two processes (torchrun, gloo): every rank holds the whole
rollout and sends it to the reward model, initial policy and critic servers (the critic
server applies each step once and answers the other rank from its cache), and the run is the
one-process in-process run on the same global batches (docs/serving.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from served_runs import (
    COMPARED,
    DEMO,
    TINY,
    assert_same_run,
    read_run,
    role_handler,
)
from served_runs import config as served_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

REPO = DEMO.parent.parent
# two ranks of half the per-device rows: the one-process run's global batches
TWO_RANKS = ["ppo.per_device_generation_batch_size=4", "ppo.per_device_training_batch_size=2"]
CRITIC_COMPARED = (*COMPARED, "value_clip_fraction", "critic_grad_norm", "critic_lr")


@pytest.mark.slow  # two torchrun processes, ~1 min on 2 cores
def test_two_ranks_with_served_roles_are_the_one_process_run(
        served_models, in_process_ppo, tmp_path, free_port):
    from shared.serving import ServerThread
    from shared.serving.critic_handler import CriticHandler
    from torch_rlhf.critic import TorchCritic

    two = served_config(*TWO_RANKS)
    critic = CriticHandler(TorchCritic(two, served_models["reward"], world_size=2),
                           checkpoint_dir=tmp_path / "critic-ckpt")
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run_dir = tmp_path / "two"
    with ServerThread(role_handler("torch", "reward", served_models["reward"], two)) as reward, \
            ServerThread(role_handler("torch", "initial-policy", served_models["policy"],
                                      two)) as policy, \
            ServerThread(critic) as critic_server:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   "-m", "shared.cli", "ppo", "--backend", "torch", "--config", str(DEMO),
                   "--run-dir", str(run_dir), "--actor", served_models["policy"],
                   "--critic", served_models["reward"], *TINY, *TWO_RANKS,
                   f"ppo.reward_model.url={reward.url}", f"ppo.initial_policy.url={policy.url}",
                   f"ppo.critic.url={critic_server.url}"]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    served = read_run(run_dir)
    assert served.entry["models"][2] == f"critic@{critic_server.url}"
    assert critic.step == 2 * 4  # each global step applied once, not once per rank:
    assert critic.repeats == 2 * 4  # the other rank's request answered from the cache
    assert_same_run(in_process_ppo("torch"), served, CRITIC_COMPARED)
