"""Which tasks a run plans (``bench.run.plan``): what ``make bench`` measures by default and
what ``--variants`` / ``--only`` add. No model runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run as bench_run
from bench.generation import IMPLEMENTATIONS


def _ids(argv: list[str]) -> list[str]:
    options = bench_run._options(bench_run.build_parser().parse_args(argv))  # noqa: SLF001
    return [t["id"] for t in bench_run.plan(options, model_root=Path("m"), work_root=Path("w"))]


def _tasks(argv: list[str]) -> list[dict]:
    options = bench_run._options(bench_run.build_parser().parse_args(argv))  # noqa: SLF001
    return bench_run.plan(options, model_root=Path("m"), work_root=Path("w"))


def test_the_default_run_keeps_what_the_targets_are_judged_on():
    ids = _ids([])
    assert ids[:2] == ["prepare", "machine/start"] and ids[-1] == "machine/end"
    for impl in ("hf", "torch", "jax"):  # generation vs HF, SFT and PPO of both backends
        assert f"generation/small/{impl}" in ids
    for kind in ("sft", "ppo"):
        assert {f"{kind}/small/torch", f"{kind}/small/jax"} <= set(ids)
    # the small model's target rows: bf16 sampler, rollout_decode packed
    assert {"generation/small/jax_bf16", "generation/small/torch_packed"} <= set(ids)
    # the tiny model only with --sizes tiny,small or --quick; cost curves keep their sizes
    assert not any("/tiny/" in i for i in ids)
    assert "generation/small/torch_compiled" not in ids


def test_the_rollout_logprobs_rows_run_in_their_recompute_rows_process():
    tasks = {t["id"]: t for t in _tasks([])}
    for backend in ("torch", "jax"):
        task = tasks[f"ppo/small/{backend}"]
        assert task["with_rollout_logprobs"] is True and "old_logprobs" not in task
        assert task["row_ids"] == [f"ppo/small/{backend}",
                                   f"ppo/small/{backend}/rollout-logprobs"]
        # no second process for the rollout row
        assert f"ppo/small/{backend}/rollout-logprobs" not in tasks
    # the task's command reproduces both rows
    options = bench_run._options(bench_run.build_parser().parse_args([]))  # noqa: SLF001
    assert bench_run._command(options, tasks["ppo/small/jax"]["row_ids"]) == (  # noqa: SLF001
        "python -m bench.run --only ppo/small/jax --only ppo/small/jax/rollout-logprobs")


def test_a_rollout_logprobs_row_picked_alone_keeps_its_own_process():
    tasks = _tasks(["--only", "ppo/small/torch/rollout-logprobs"])[2:-1]
    assert [(t["id"], t.get("old_logprobs"), t.get("with_rollout_logprobs")) for t in tasks] == [
        ("ppo/small/torch/rollout-logprobs", "rollout", None)]
    recompute = _tasks(["--only", "ppo/small/torch"])[2:-1]
    assert [t["id"] for t in recompute] == ["ppo/small/torch"]
    assert "with_rollout_logprobs" not in recompute[0]


def test_every_workload_takes_two_timed_calls():
    repeats = {t["id"]: t["repeats"] for t in _tasks([]) if "repeats" in t}
    assert repeats["generation/small/hf"] == repeats["sft/small/torch"] == 2
    assert repeats["ppo/small/jax"] == 2 and _tasks(["--repeats", "3"])[2]["repeats"] == 3


def test_variants_plan_every_row_at_every_size():
    ids = set(_ids(["--variants", "--sizes", "tiny,small"]))
    tasks = {t["id"]: t for t in _tasks(["--variants", "--sizes", "tiny,small"])}
    for size in ("tiny", "small"):
        assert {f"generation/{size}/{impl}" for impl in IMPLEMENTATIONS} <= ids
        for b in ("torch", "jax"):
            assert tasks[f"ppo/{size}/{b}"]["row_ids"][1] == f"ppo/{size}/{b}/rollout-logprobs"


@pytest.mark.parametrize("pattern, expected", [
    ("generation/tiny/torch_compiled", ["generation/tiny/torch_compiled"]),
    ("ppo/tiny/*/rollout-logprobs", ["ppo/tiny/torch/rollout-logprobs",
                                     "ppo/tiny/jax/rollout-logprobs"]),
])
def test_only_picks_from_every_row(pattern, expected):
    assert _ids(["--sizes", "tiny,small", "--only", pattern])[2:-1] == expected


def test_the_largest_size_given_gets_the_target_rows():
    ids = _ids(["--sizes", "micro,tiny"])
    assert "generation/tiny/jax_bf16" in ids and "generation/micro/jax_bf16" not in ids
    assert "generation/micro/jax" in ids
