"""Two runs on one run directory (shared/runlock.py): while a pipeline runs (frozen in SFT,
just after its first checkpoint),
a second ``rlhf pipeline`` on the same ``--run-dir``, fresh or ``--resume``, and with
another config, fails at once with one line naming the owner's pid, and writes nothing;
once the owner is killed with SIGKILL, ``--resume`` takes the stale lock over (a warning)
and ends as an uninterrupted run."""

from __future__ import annotations

import time

import pytest
from fault_harness import (
    REPO,
    SEED,
    assert_one_line_failure,
    assert_same_run,
    freeze_at,
    pipeline_argv,
    rlhf,
)


# both slow (22 s each): the lock itself is unit-tested in tests/shared/test_runlock.py
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_second_run_on_a_busy_directory_fails_at_once(backend, tiny_config, env,
                                                       reference_run, tmp_path):
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    owner = freeze_at({"point": "save-complete", "step": "sft", "occurrence": 1},
                      pipeline_argv(tiny_config, backend, run_dir), env=env, cwd=REPO,
                      workdir=tmp_path / "kills")
    try:
        snapshot = (run_dir / "config.yaml").read_bytes()
        metrics = (run_dir / "metrics.jsonl").read_bytes()
        for argv in (pipeline_argv(tiny_config, backend, run_dir),
                     pipeline_argv(tiny_config, backend, run_dir, resume=True),
                     [*pipeline_argv(tiny_config, backend, run_dir), f"seed={SEED + 1}"]):
            start = time.perf_counter()
            result = rlhf(argv, env=env, cwd=REPO, timeout=120)
            seconds = time.perf_counter() - start
            assert_one_line_failure(result, 1, f"run directory {run_dir} is in use by pid "
                                               f"{owner.proc.pid}")
            assert seconds < 60, seconds  # refused before any model is built
            assert (run_dir / "config.yaml").read_bytes() == snapshot
            assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    finally:
        owner.kill()

    result = rlhf(pipeline_argv(tiny_config, backend, run_dir, resume=True), env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over the stale lock" in result.stderr
    assert_same_run(reference, run_dir)
