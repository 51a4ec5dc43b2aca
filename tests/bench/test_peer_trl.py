"""bench.peer_trl: the TRL PPO config mapping (pure Python), and, where TRL is installed
(``pip install .[peer]``; the default install has no TRL), one micro iteration of each side
doing the same work. No timing is asserted."""

from __future__ import annotations

import importlib.util

import pytest

from bench.peer_trl import MICRO_SHAPES, trl_ppo_config_kwargs, trl_work
from bench.workspace import Shapes


@pytest.mark.parametrize("shapes", [Shapes(), Shapes(ppo_rollout_batch=32, ppo_minibatch=8),
                                    MICRO_SHAPES])
def test_peer_trl_mapping_matches_the_bench_iteration(shapes):
    kwargs = trl_ppo_config_kwargs(shapes)
    work = trl_work(kwargs)
    assert work == {"updates": 1, "rows": shapes.ppo_rollout_batch,
                    "generated_tokens": shapes.ppo_rollout_batch * shapes.answer_len,
                    "optimizer_steps": shapes.ppo_steps, "rows_per_step": shapes.ppo_minibatch}
    assert kwargs["num_ppo_epochs"] == 1
    assert kwargs["stop_token"] is None and kwargs["stop_token_id"] is None
    assert kwargs["missing_eos_penalty"] is None
    assert not kwargs["bf16"] and not kwargs["fp16"] and not kwargs["gradient_checkpointing"]


def test_peer_trl_mapping_rejects_uneven_minibatches():
    with pytest.raises(ValueError, match="ppo_rollout_batch"):
        trl_ppo_config_kwargs(Shapes(ppo_rollout_batch=12, ppo_minibatch=8))
    with pytest.raises(ValueError, match="num_mini_batches"):
        trl_work({**trl_ppo_config_kwargs(Shapes()), "num_mini_batches": 3})


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="trl is not installed (the bench-only extra: pip install .[peer])")
def test_peer_trl_one_micro_iteration_does_the_same_work(tmp_path):
    from bench.peer_trl import run_peer

    result = run_peer("micro", repeats=1, warmup=0, model_root=tmp_path / "models",
                      work_dir=tmp_path / "work")
    shapes = MICRO_SHAPES
    tokens = shapes.ppo_rollout_batch * shapes.answer_len
    (trl,) = result["iterations"]["trl"]
    assert trl["generated_tokens"] == tokens
    assert trl["optimizer_steps"] == shapes.ppo_steps  # one AdamW over actor + critic
    assert trl["step_rows"] == [shapes.ppo_minibatch] * shapes.ppo_steps
    # undistributed, or a world of one when an earlier test of this process already started
    # torch.distributed (Accelerate then says MULTI_CPU; `python -m bench.peer_trl` says NO)
    assert result["trl_distributed_type"] in ("NO", "MULTI_CPU")
    for variant in ("ours_recompute", "ours_rollout"):
        (ours,) = result["iterations"][variant]
        assert ours["generated_tokens"] == tokens
        assert ours["response_length"] == shapes.answer_len
        assert ours["optimizer_steps"] == {"actor": shapes.ppo_steps,
                                           "critic": shapes.ppo_steps}
