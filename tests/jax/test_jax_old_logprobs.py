"""`conventions.old_logprobs: rollout` on the JAX backend: on the same weights in fp32 the
sampler's log-probs are the training forward's, so skipping the actor's scoring forward
trains as recomputing it (to float tolerance)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax_tiny_runs import make_context

from jax_rlhf.params import to_host
from jax_rlhf.train.ppo import PPOTrainer


def _train(tiny_config, tmp_path, name, **conventions):
    config = tiny_config(ppo={"max_iterations": 2, "old_logprobs_check_interval": 2,
                              "conventions": conventions})
    ctx = make_context(config, tmp_path / name)
    trainer = PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)
    calls = []
    score = trainer.score

    def recording(*args, **kwargs):
        calls.append(kwargs.get("logprobs", True))
        return score(*args, **kwargs)

    trainer.score = recording
    metrics = [trainer.train_iteration() for _ in range(2)]
    return trainer, metrics, calls


@pytest.mark.slow  # two trainers, three compiled scoring passes: ~40 s on 2 cores
def test_rollout_old_logprobs_train_as_recomputed_ones(tiny_config, tmp_path):
    ref, ref_metrics, ref_calls = _train(tiny_config, tmp_path, "recompute")
    run, metrics, calls = _train(tiny_config, tmp_path, "rollout", old_logprobs="rollout")
    assert ref_calls == [True, True] and calls == [True, False]  # checked at iteration 0
    assert metrics[0]["rollout_logprob_gap"] < 1e-4
    assert [m["old_logprobs_recomputed"] for m in metrics] == [0.0, 0.0]
    for key in ("actor_loss", "critic_loss", "reward_score", "kl", "approx_kl"):
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in ref_metrics],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(to_host(run.actor_state.params)),
                    jax.tree.leaves(to_host(ref.actor_state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert ref.iteration == run.iteration == 2


