"""`conventions.old_logprobs` on the numpy stand-in backend of `test_ppo_loop`: "rollout"
trains as "recompute" when the sampler's log-probs are the forward's, skips the actor's
scoring forward between checks, falls back on a gap over the bound (warning, metric, state
kept across a resume), and the config refuses what it cannot mean."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_ppo_loop import NumpyPPO, _config

from shared.config import ConfigError
from shared.old_logprobs import OldLogprobs
from shared.presets import PRESETS, get_preset


class ExactPPO(NumpyPPO):
    """The sampler records the training forward's log-probs (plus `offset`), and every
    score call says whether it ran the actor."""

    def __init__(self, *args, offset: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = offset
        self.actor_forwards: list[bool] = []

    def generate(self, prompt_ids, prompt_mask, uniforms):
        tokens, mask, _ = super().generate(prompt_ids, prompt_mask, uniforms)
        forward = NumpyPPO.score(self, prompt_ids, prompt_mask, tokens, mask)["logprobs"]
        return tokens, mask, (forward + self.offset) * mask

    def score(self, prompt_ids, prompt_mask, response, sample_mask, *, logprobs=True):
        self.actor_forwards.append(logprobs)
        out = super().score(prompt_ids, prompt_mask, response, sample_mask)
        if not logprobs:
            del out["logprobs"]
        return out


def _run(tmp_path, name, *, offset=0.0, **ppo):
    loop = ExactPPO(_config(tmp_path, **ppo), tmp_path / name, offset=offset)
    metrics = [loop.train_iteration() for _ in range(loop.total_iterations)]
    return loop, metrics


def _training(metrics):
    keys = ("actor_loss", "critic_loss", "reward_score", "kl", "advantages_mean")
    return [[m[k] for k in keys] for m in metrics]


def test_rollout_trains_as_recompute_when_the_gap_is_zero(tmp_path):
    ref, ref_metrics = _run(tmp_path, "recompute")
    loop, metrics = _run(tmp_path, "rollout", conventions={"old_logprobs": "rollout"},
                         old_logprobs_check_interval=2)
    np.testing.assert_allclose(_training(metrics), _training(ref_metrics), rtol=1e-6)
    assert loop.w == pytest.approx(ref.w, rel=1e-6)
    # 3 iterations x 2 generation batches: the actor runs at iterations 0 and 2 only
    assert loop.actor_forwards == [True, True, False, False, True, True]
    assert all(ref.actor_forwards)
    assert [m["old_logprobs_recomputed"] for m in metrics] == [0.0, 0.0, 0.0]
    assert "old_logprobs_recomputed" not in ref_metrics[0]
    assert metrics[0]["rollout_logprob_gap"] == 0.0
    # iteration 1 measured nothing: its gap is iteration 0's, and says so
    assert [m["rollout_logprob_gap_measured"] for m in metrics] == [1.0, 0.0, 1.0]


def test_a_gap_over_the_bound_falls_back_to_recompute(tmp_path, caplog):
    ref, ref_metrics = _run(tmp_path, "recompute", offset=0.5)
    with caplog.at_level(logging.WARNING, logger="shared.old_logprobs"):
        loop, metrics = _run(tmp_path, "rollout", offset=0.5,
                             conventions={"old_logprobs": "rollout"},
                             old_logprobs_max_gap=0.1, old_logprobs_check_interval=5)
    warnings = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(warnings) == 1 and "0.5" in warnings[0] and "0.1" in warnings[0]
    assert loop.old_logprobs.fell_back_at == 0
    assert all(loop.actor_forwards)  # checked at iteration 0, recomputed from then on
    assert [m["old_logprobs_recomputed"] for m in metrics] == [1.0, 1.0, 1.0]
    assert metrics[0]["rollout_logprob_gap"] == pytest.approx(0.5, abs=1e-6)
    # the fallback batch already trains on the recomputed log-probs
    np.testing.assert_allclose(_training(metrics), _training(ref_metrics), rtol=1e-6)


def test_the_fallback_is_kept_across_a_resume(tmp_path):
    loop, _ = _run(tmp_path, "run", offset=0.5, conventions={"old_logprobs": "rollout"},
                   old_logprobs_max_gap=0.1)
    assert loop.loop_state()["old_logprobs"]["fell_back_at"] == 0
    loop.save()
    again = ExactPPO(loop.config, tmp_path / "run", offset=0.5)
    assert again.old_logprobs.uses_rollout
    assert again.resume()
    assert not again.old_logprobs.uses_rollout
    assert again.old_logprobs.last_gap == pytest.approx(0.5, abs=1e-6)


def test_a_reused_batch_is_always_recomputed():
    rule = OldLogprobs(mode="rollout", max_gap=0.1, check_interval=10)
    sample, recomputed = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    mask = np.ones((2, 3), np.float32)
    old, gap = rule.choose(sample_logprobs=sample, recomputed=recomputed, sample_mask=mask,
                           iteration=3, where="x", stale=True)
    np.testing.assert_array_equal(old, recomputed)
    assert gap == 1.0 and rule.uses_rollout  # a stale rollout's gap is no reason to fall back
    assert not rule.recompute(3) and rule.recompute(10)


def test_every_preset_recomputes():
    assert {name: p.old_logprobs for name, p in PRESETS.items()} == {
        name: "recompute" for name in PRESETS}


@pytest.mark.parametrize("conventions, match", [
    ({"rollout_correction": "tis"}, "rollout_correction"),
    ({"zero_after_end": True, "gae_mask_mode": "zero_after_end"}, "zero_after_end"),
    ({"old_logprobs": "sampler"}, "old_logprobs"),
])
def test_conventions_refuse_what_rollout_cannot_mean(conventions, match):
    with pytest.raises(ValueError, match=match):
        get_preset("default", **{"old_logprobs": "rollout", **conventions})


@pytest.mark.parametrize("ppo, match", [
    ({"old_logprobs_max_gap": -1.0}, "old_logprobs_max_gap"),
    ({"old_logprobs_max_gap": float("nan")}, "old_logprobs_max_gap"),
    ({"old_logprobs_check_interval": 0}, "old_logprobs_check_interval"),
])
def test_config_refuses_a_bad_bound_or_interval(tmp_path, ppo, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **ppo)
