"""`rlhf launch` starts a critic server for the actor's processes: `--world-size` is the run's
process count (the critic's number of steps, its LR schedule, depends on it); rank 0 alone
starts the servers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shared.config import load_config
from shared.errors import process_count
from shared.serving import launch

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


class FakeProcess:
    def __init__(self, argv, **_):
        self.argv = argv

    def poll(self):
        return None


@pytest.fixture
def started(monkeypatch, tmp_path):
    argvs = []

    def popen(argv, **kwargs):
        argvs.append(argv)
        return FakeProcess(argv)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch.Launcher, "_wait", lambda *a: None)
    config = load_config(DEMO, ["ppo.critic.url=http://127.0.0.1:5557",
                                "ppo.critic.model=some/critic"])
    args = argparse.Namespace(backend="torch", config=None, overrides=[], actor=None,
                              critic=None)

    def start():
        launch.Launcher(config, args).before_step("ppo", tmp_path)
        return argvs

    return start


def test_the_critic_server_gets_the_runs_process_count(started, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert process_count() == 4
    (argv,) = started()
    assert argv[argv.index("--world-size") + 1] == "4"
    assert argv[argv.index("serve") + 1] == "critic"


def test_alone_the_world_is_one_and_other_ranks_start_nothing(started, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    (argv,) = started()
    assert argv[argv.index("--world-size") + 1] == "1"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert started() == [argv]  # nothing more started on rank 1
