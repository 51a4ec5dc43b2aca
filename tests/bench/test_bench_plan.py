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


def test_the_default_run_keeps_what_the_targets_are_judged_on():
    ids = _ids([])
    assert ids[:2] == ["prepare", "machine/start"] and ids[-1] == "machine/end"
    for size in ("tiny", "small"):  # generation vs HF, SFT and PPO of both backends
        for impl in ("hf", "torch", "jax"):
            assert f"generation/{size}/{impl}" in ids
        for kind in ("sft", "ppo"):
            assert {f"{kind}/{size}/torch", f"{kind}/{size}/jax"} <= set(ids)
    # the largest size's target rows: bf16 sampler, rollout_decode packed, rollout log-probs
    assert {"generation/small/jax_bf16", "generation/small/torch_packed",
            "ppo/small/torch/rollout-logprobs", "ppo/small/jax/rollout-logprobs"} <= set(ids)
    assert not any(i.startswith("generation/tiny/") and i.split("/")[2] not in
                   bench_run.CORE_IMPLEMENTATIONS for i in ids)
    assert "ppo/tiny/torch/rollout-logprobs" not in ids
    assert "generation/small/torch_compiled" not in ids


def test_variants_plan_every_row_at_every_size():
    ids = set(_ids(["--variants"]))
    for size in ("tiny", "small"):
        assert {f"generation/{size}/{impl}" for impl in IMPLEMENTATIONS} <= ids
        assert {f"ppo/{size}/{b}/rollout-logprobs" for b in ("torch", "jax")} <= ids


@pytest.mark.parametrize("pattern, expected", [
    ("generation/tiny/torch_compiled", ["generation/tiny/torch_compiled"]),
    ("ppo/tiny/*/rollout-logprobs", ["ppo/tiny/torch/rollout-logprobs",
                                     "ppo/tiny/jax/rollout-logprobs"]),
])
def test_only_picks_from_every_row(pattern, expected):
    assert _ids(["--only", pattern])[2:-1] == expected


def test_the_largest_size_given_gets_the_target_rows():
    ids = _ids(["--sizes", "micro,tiny"])
    assert "generation/tiny/jax_bf16" in ids and "generation/micro/jax_bf16" not in ids
    assert "generation/micro/jax" in ids
