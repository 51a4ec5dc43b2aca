"""`rlhf launch`: starts the servers the config names on this machine just before PPO, runs
the pipeline against them, and stops them (and nothing else) at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVED = ROOT / "configs" / "demo-served.yaml"
TINY = ["sft.max_steps=4", "reward.max_steps=4", "sft.per_device_train_batch_size=8",
        "reward.per_device_train_batch_size=8", "ppo.per_device_generation_batch_size=8",
        "ppo.per_device_training_batch_size=4", "ppo.max_iterations=2", "ppo.unsup_coef=0",
        "eval.max_prompts=8", "eval.samples_per_prompt=1", "logging.plots=false"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _rlhf(argv, cwd):
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return subprocess.run([sys.executable, "-m", "shared.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~60 s of subprocesses on 2 cores; tests/test_served_critic.py's torch case
# (default suite) runs the same three served roles through the loop in process
def test_launch_serves_reward_initial_policy_and_critic_for_the_ppo_step(tmp_path, free_port):
    ports = [free_port(), free_port(), free_port()]
    run_dir = tmp_path / "run"
    done = _rlhf(["launch", "--config", str(SERVED), "--backend", "torch", "--run-dir",
                  str(run_dir), f"ppo.reward_model.url=http://127.0.0.1:{ports[0]}",
                  f"ppo.initial_policy.url=http://127.0.0.1:{ports[1]}",
                  f"ppo.critic.url=http://127.0.0.1:{ports[2]}", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ppo"]["models"] == [
        "actor", f"reference@http://127.0.0.1:{ports[1]}", f"critic@http://127.0.0.1:{ports[2]}",
        f"reward_model@http://127.0.0.1:{ports[0]}"]
    assert "heldout" in summary["ppo"]
    assert Path(summary["ppo"]["critic_model"]) == run_dir / "ppo" / "critic"  # the server's
    assert (run_dir / "ppo" / "critic-server" / "iter-00000002" / "critic_server.json").is_file()
    for role, model in (("reward", "reward"), ("initial-policy", "sft"), ("critic", "reward")):
        log = (run_dir / "servers" / f"{role}.log").read_text()
        assert f"serving {role} (torch backend, model {run_dir / model / 'final'})" in log
    assert not any(_listening(p) for p in ports)  # stopped at the end


def test_launch_refuses_a_server_on_another_machine(tmp_path):
    done = _rlhf(["launch", "--config", str(SERVED),
                  "ppo.reward_model.url=http://10.1.2.3:5555"], tmp_path)
    assert done.returncode == 2
    assert "the reward server http://10.1.2.3:5555 is not on this machine" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_launch_reports_a_server_that_exits_while_starting(tmp_path, free_port):
    """A critic server that cannot load its model exits; launch says so with its log's end
    (not a timeout of ppo.critic.timeout_s later) and the run fails."""
    port = free_port()
    done = _rlhf(["launch", "--config", str(SERVED), "--backend", "torch", "--run-dir",
                  str(tmp_path / "run"), f"ppo.critic.url=http://127.0.0.1:{port}",
                  f"ppo.critic.model={tmp_path / 'no-such-model'}",
                  f"ppo.reward_model.url=http://127.0.0.1:{free_port()}",
                  f"ppo.initial_policy.url=http://127.0.0.1:{free_port()}",
                  "ppo.critic.timeout_s=600", *TINY], tmp_path)
    assert done.returncode != 0
    assert "the critic server did not become ready (exited with status" in done.stderr
    assert not _listening(port)
