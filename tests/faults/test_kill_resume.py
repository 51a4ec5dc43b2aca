"""kill -9 anywhere, then ``--resume``: the run ends as if it had never been interrupted.

Each case runs ``rlhf pipeline`` on the tiny config (``fault_harness.TINY``: SFT and reward 3
steps, PPO 3 iterations, a checkpoint after each) as a subprocess, freezes it at a chosen
point (``stop_at.py``: during a checkpoint save, during the final save, between a metrics
record and its checkpoint, ...) or after a delay, kills it with SIGKILL, resumes it with
``rlhf pipeline --resume --run-dir`` and compares the run directory with an uninterrupted
run of the same config: every metrics.jsonl row equal (wall-clock keys aside), the summary
equal (timings aside), every final model (SFT, reward, PPO actor, critic, EMA) bit for bit.

The default suite kills each backend once in the middle of a PPO checkpoint save; the slow
suite kills each backend at three points of each step drawn from a seeded RNG, at seeded
random delays, and three times in a row in one run.
"""

from __future__ import annotations

import random
import shutil

import pytest
from fault_harness import (
    REPO,
    SEED,
    assert_same_run,
    checkpoint_dirs,
    kill_after,
    kill_at,
    pipeline_argv,
    rlhf,
)

SAVES = 3
"""Checkpoints per step (3 steps or iterations, save_interval 1)."""

TORCH_FILES = {"sft": 3, "reward": 3, "ppo": 4}
"""torch.save calls per checkpoint: each engine's DeepSpeed state, the RNG, the trainer
state."""


def candidates(backend: str, step: str) -> dict[str, int]:
    """Every point of ``step`` a kill can target (``stop_at.py``) and how often it happens."""
    points = {"logged": SAVES, "save-begin": SAVES, "save-written": SAVES,
              "save-manifest": SAVES, "save-complete": SAVES}
    if backend == "torch":
        points["save-file"] = SAVES * TORCH_FILES[step]
    # PPO exports final, critic and EMA (torch writes the EMA without save_hf)
    points["export-model"] = 1 if step != "ppo" else (2 if backend == "torch" else 3)
    points["export-written"] = 3 if step == "ppo" else 1
    points["summary"] = 1
    return points


def drawn_points(seed: int = SEED, per_step: int = 3) -> list[tuple[str, str, str, int]]:
    """``per_step`` (backend, step, point, occurrence) per backend and step: distinct points,
    then an occurrence of each, drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for backend in ("torch", "jax"):
        for step in ("sft", "reward", "ppo"):
            points = candidates(backend, step)
            for point in rng.sample(sorted(points), per_step):
                out.append((backend, step, point, rng.randint(1, points[point])))
    return out


def _check_frozen_state(run_dir, step: str, point: str, occurrence: int) -> None:
    """What the run directory holds when the kill lands (the point was the one meant)."""
    saves = checkpoint_dirs(run_dir, step)
    if point in ("save-file", "save-written", "save-manifest"):
        newest = sorted(saves)[-1]
        assert not saves[newest], f"{newest} complete at {point}"
    if point == "save-complete":
        assert saves[sorted(saves)[-1]], saves
        assert sum(saves.values()) == min(occurrence, 2), saves  # the old one not pruned yet
    if point in ("export-written", "summary"):
        assert (run_dir / step / "final" / "config.json").is_file()


def _kill_and_resume(backend, step, point, occurrence, *, tiny_config, env, reference_run,
                     tmp_path) -> None:
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    kill = kill_at({"point": point, "step": step, "occurrence": occurrence},
                   pipeline_argv(tiny_config, backend, run_dir), env=env, cwd=REPO,
                   workdir=tmp_path / "kills")
    assert kill.reached == {**kill.reached, "point": point, "step": step,
                            "occurrence": occurrence}
    _check_frozen_state(run_dir, step, point, occurrence)
    result = rlhf(pipeline_argv(tiny_config, backend, run_dir, resume=True), env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize(("backend", "point", "occurrence"), [
    ("torch", "save-file", 6),     # iteration 2's save: actor and critic written, RNG not yet
    ("jax", "save-written", 2),    # iteration 2's save: orbax still writing in the background
])
def test_killed_during_a_ppo_checkpoint_save_resumes_exactly(backend, point, occurrence,
                                                             tiny_config, env, reference_run,
                                                             tmp_path):
    _kill_and_resume(backend, "ppo", point, occurrence, tiny_config=tiny_config, env=env,
                     reference_run=reference_run, tmp_path=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "step", "point", "occurrence"), drawn_points(),
                         ids=[f"{b}-{s}-{p}-{n}" for b, s, p, n in drawn_points()])
def test_killed_at_a_drawn_point_resumes_exactly(backend, step, point, occurrence, tiny_config,
                                                 env, reference_run, tmp_path):
    _kill_and_resume(backend, step, point, occurrence, tiny_config=tiny_config, env=env,
                     reference_run=reference_run, tmp_path=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_killed_three_times_resumes_exactly(backend, tiny_config, env, reference_run, tmp_path):
    """Killed during SFT's second save, then (resumed) at the reward model's final export,
    then (resumed) during PPO's last save: the third resume still ends as the uninterrupted
    run."""
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    points = [("sft", "save-manifest", 2), ("reward", "export-written", 1),
              ("ppo", "save-written", 3)]
    for i, (step, point, occurrence) in enumerate(points):
        kill_at({"point": point, "step": step, "occurrence": occurrence},
                pipeline_argv(tiny_config, backend, run_dir, resume=i > 0), env=env,
                cwd=REPO, workdir=tmp_path / "kills")
    result = rlhf(pipeline_argv(tiny_config, backend, run_dir, resume=True), env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_killed_after_random_delays_resumes_exactly(backend, tiny_config, env, jax_cache,
                                                    reference_run, tmp_path):
    """SIGKILL after seeded random delays over the run's life (where it lands depends on the
    machine's speed; the outcome may not). Each kill gets a private copy of the JAX
    compilation cache, whose writes are not atomic."""
    reference = reference_run(backend)
    rng = random.Random(SEED)
    for trial in range(3):
        private = tmp_path / f"jax-cache-{trial}"
        if jax_cache.is_dir():
            shutil.copytree(jax_cache, private)
        trial_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(private)}
        run_dir = tmp_path / f"run-{trial}"
        delay = rng.uniform(3.0, 20.0 if backend == "jax" else 10.0)
        kill_after(delay, pipeline_argv(tiny_config, backend, run_dir), env=trial_env,
                   cwd=REPO, workdir=tmp_path / "kills")
        argv = pipeline_argv(tiny_config, backend, run_dir, resume=(run_dir / "config.yaml")
                             .is_file())
        result = rlhf(argv, env=trial_env, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_run(reference, run_dir)
