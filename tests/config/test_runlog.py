"""shared.runlog: the run directory layout both backends write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from shared.config import config_from_dict, load_config
from shared.manifest import ResumeMismatchError
from shared.runlock import RunDirLock, RunDirLockedError
from shared.runlog import PhaseTimer, RunLogger, prepare_run_dir

CONFIG = config_from_dict({"model": {"actor_model_name_or_path": "x"}, "run_name": "r1"})
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_prepare_run_dir_snapshots_config(tmp_path):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    assert run_dir == tmp_path / "r1"
    assert load_config(run_dir / "config.yaml") == config


def test_runs_land_under_the_working_directory(tmp_path, monkeypatch):
    """`rlhf pipeline` with the shipped demo writes ./runs/<demo-time> wherever it is run (in
    the checkout under `make demo`), never next to the installed config; `./x` in a config
    file of one's own is next to that file."""
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "demo.yaml")
    assert config.output_dir == "runs"
    run_dir = prepare_run_dir(config, config_path=CONFIGS / "demo.yaml")
    assert run_dir.resolve().parent == tmp_path.resolve() / "runs"
    assert run_dir.name.startswith("demo-") and (run_dir / "config.yaml").is_file()
    assert prepare_run_dir(config, config_path=CONFIGS / "demo.yaml", resume=True) == run_dir
    for shipped in sorted(CONFIGS.glob("*.yaml")):
        output_dir = yaml.safe_load(shipped.read_text()).get("output_dir", "runs")
        assert not output_dir.startswith(("./", "../", "/")), shipped.name
    mine = tmp_path / "exp" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text(yaml.safe_dump({"base": str(CONFIGS / "demo.yaml"), "output_dir": "./out"}))
    assert load_config(mine).output_dir == str(tmp_path / "exp" / "out")


def test_resume_requires_the_same_config(tmp_path):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    assert prepare_run_dir(config, resume=True) == run_dir
    with pytest.raises(ValueError, match="differs from the run's snapshot") as err:
        prepare_run_dir(config.replace(seed=5, backend="jax"), resume=True)
    message = str(err.value)
    assert f"backend: 'torch' -> 'jax'; seed: {config.seed!r} -> 5" in message
    assert f"--config {run_dir / 'config.yaml'}`" in message and "{snapshot}" not in message
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        prepare_run_dir(config, run_dir=tmp_path / "other", resume=True)


def test_resume_without_run_dir_continues_the_newest_run(tmp_path, caplog):
    config = CONFIG.replace(output_dir=str(tmp_path), run_name=None)
    for name in ("demo-20250102-000000", "demo-20250101-235959", "other-20260101-000000"):
        prepare_run_dir(config, run_dir=tmp_path / name)
    (tmp_path / "demo-20990101-000000").mkdir()  # no snapshot: not a run
    with caplog.at_level(logging.INFO, logger="shared.runlog"):
        run_dir = prepare_run_dir(config, config_path="configs/demo.yaml", resume=True)
    assert run_dir == tmp_path / "demo-20250102-000000"
    assert f"continuing {run_dir}, the newest of 2 run(s) of 'demo'" in caplog.text
    with pytest.raises(FileNotFoundError, match="no run of 'nothing' to continue"):
        prepare_run_dir(config, config_path="nothing.yaml", resume=True)
    named = config.replace(run_name="r1")
    assert prepare_run_dir(named) == tmp_path / "r1"
    assert prepare_run_dir(named, config_path="configs/demo.yaml", resume=True) == tmp_path / "r1"


@pytest.mark.parametrize("where", ["summary", "manifest"])
def test_resuming_another_backends_run_is_refused(tmp_path, where):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    if where == "summary":
        (run_dir / "summary.json").write_text(json.dumps({"backend": "jax"}))
    else:
        checkpoint = run_dir / "sft" / "checkpoints" / "step-00000002"
        checkpoint.mkdir(parents=True)
        (checkpoint / "MANIFEST.json").write_text(json.dumps({"backend": "jax", "files": {}}))
    assert prepare_run_dir(config, resume=True, backend="jax") == run_dir
    with pytest.raises(ResumeMismatchError, match="written by the jax backend and this run uses "
                                                  "torch.*--backend jax"):
        prepare_run_dir(config, resume=True, backend="torch")


def test_the_pipeline_refuses_to_resume_another_backends_run(tmp_path):
    from shared.pipeline import Backend, Session, run_pipeline

    class Fake(Backend):
        def trainer(self, step):
            raise AssertionError("no step may run")

        def open_session(self, config, run_dir):
            return Session(RunLogger(run_dir, enable_tensorboard=False))

    (tmp_path / "summary.json").write_text(json.dumps({"backend": "jax"}))
    with pytest.raises(ResumeMismatchError, match="summary.json"):
        run_pipeline(Fake("torch", {}, session=""), CONFIG, tmp_path, resume=True)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"backend": "jax"}


def test_a_directory_in_use_is_refused_before_anything_is_written(tmp_path):
    config = CONFIG.replace(output_dir=str(tmp_path))
    run_dir = prepare_run_dir(config)
    snapshot = (run_dir / "config.yaml").read_text()
    with RunDirLock(run_dir):  # another writer (a second lock in this process counts as one)
        with pytest.raises(RunDirLockedError, match="in use by pid"):
            prepare_run_dir(config.replace(seed=9))
        with pytest.raises(RunDirLockedError):
            prepare_run_dir(config, resume=True)
    assert (run_dir / "config.yaml").read_text() == snapshot


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
