"""shared.runlog: the run directory layout both backends write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import config_from_dict, load_config
from shared.runlog import PhaseTimer, RunLogger, prepare_run_dir

CONFIG = config_from_dict({"model": {"actor_model_name_or_path": "x"}, "run_name": "r1"})


def test_prepare_run_dir_snapshots_config(tmp_path):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    assert run_dir == tmp_path / "r1"
    assert load_config(run_dir / "config.yaml") == config


def test_resume_requires_the_same_config(tmp_path):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    assert prepare_run_dir(config, resume=True) == run_dir
    with pytest.raises(ValueError, match="differs from the run's snapshot"):
        prepare_run_dir(config.replace(seed=5), resume=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        prepare_run_dir(config, run_dir=tmp_path / "other", resume=True)


def test_metrics_summary_and_tensorboard(tmp_path):
    log = RunLogger(tmp_path, enable_tensorboard=True)
    log.log("ppo", 0, {"reward": np.float32(0.5), "kl": 0.25, "path": "module"})
    log.log("ppo", 1, {"reward": 0.75, "kl": float("nan")})
    log.update_summary(sft={"accuracy": 0.5})
    summary = log.update_summary(ppo={"accuracy": 0.8})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1]
    assert lines[0]["reward"] == 0.5 and lines[0]["path"] == "module"
    assert lines[1]["kl"] == "nan"  # non-finite values stay visible, as strings
    assert summary == {"sft": {"accuracy": 0.5}, "ppo": {"accuracy": 0.8}}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_main_rank_writes_nothing(tmp_path):
    log = RunLogger(tmp_path, is_main=False)
    log.log("sft", 0, {"loss": 1.0})
    log.update_summary(x=1)
    assert list(tmp_path.iterdir()) == []


def test_phase_timer_accumulates_and_resets():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("generation"):
            pass
    times = timer.pop()
    assert set(times) == {"generation_time"} and times["generation_time"] >= 0
    assert timer.pop() == {}
