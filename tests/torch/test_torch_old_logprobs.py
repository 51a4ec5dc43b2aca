"""`conventions.old_logprobs: rollout` on the torch backend: on the same weights in fp32 the
sampler's log-probs are the training forward's, so skipping the actor's scoring forward
trains as recomputing it (to float tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rlhf_configs import family_models, merge, write_config

from torch_rlhf.models import unwrap_model
from torch_rlhf.ppo import PPOTrainer
from torch_rlhf.saving import gather_params_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


def _train(tmp_path, data_cache, model_dir, name, **conventions):
    overrides = merge(family_models(model_dir), {
        "data": {"cache_dir": data_cache},
        "ppo": {"unsup_coef": 0.0, "max_iterations": 2, "old_logprobs_check_interval": 2,
                "conventions": conventions}})
    _, config = write_config(tmp_path / name, overrides)
    trainer = PPOTrainer(config, run_dir=tmp_path / name / "run")
    calls = []
    score = trainer.score

    def recording(*args, **kwargs):
        calls.append(kwargs.get("logprobs", True))
        return score(*args, **kwargs)

    trainer.score = recording
    metrics = [trainer.train_iteration() for _ in range(2)]
    with gather_params_for(trainer.engine.actor):
        weights = {n: p.detach().clone()
                   for n, p in unwrap_model(trainer.engine.actor).named_parameters()}
    return weights, metrics, calls


def test_rollout_old_logprobs_train_as_recomputed_ones(tmp_path, distributed, model_dirs,
                                                       data_cache):
    model_dir = model_dirs("llama_gqa_untied")
    ref, ref_metrics, ref_calls = _train(tmp_path, data_cache, model_dir, "recompute")
    run, metrics, calls = _train(tmp_path, data_cache, model_dir, "rollout",
                                 old_logprobs="rollout")
    assert ref_calls == [True, True] and calls == [True, False]  # checked at iteration 0
    assert metrics[0]["rollout_logprob_gap"] < 1e-4
    assert [m["old_logprobs_recomputed"] for m in metrics] == [0.0, 0.0]
    for key in ("actor_loss", "critic_loss", "reward_score", "kl", "approx_kl"):
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in ref_metrics],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    for name in ref:
        torch.testing.assert_close(run[name], ref[name], rtol=1e-4, atol=1e-6)
