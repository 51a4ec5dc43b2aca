"""The critic-free parts of `shared.ppo_loop` on the numpy stand-in backend of
`test_ppo_loop`: the group layout, per-row sampling uniforms within a group (reproducible),
the outcome estimators, no critic and no reward model where the run needs none, the
rule-based reward (its errors name the row), the rollout correction, and the config checks."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from test_ppo_loop import NumpyPPO, _config

from shared.config import ConfigError
from shared.critic_free import models_used, outcome_advantages
from shared.data.demo import arithmetic_reward
from shared.errors import RunError
from shared.group_advantages import grpo_advantages


class RecordingPPO(NumpyPPO):
    """Records what crosses the protocol; a critic-free run must never ask for values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated: list[dict[str, np.ndarray]] = []

    def generate(self, prompt_ids, prompt_mask, uniforms):
        self.generated.append({"prompt_ids": prompt_ids.copy(), "uniforms": uniforms.copy()})
        return super().generate(prompt_ids, prompt_mask, uniforms)

    def score(self, prompt_ids, prompt_mask, response, sample_mask):
        out = super().score(prompt_ids, prompt_mask, response, sample_mask)
        if "critic" not in self.models:
            del out["values"]  # a backend without a critic returns none
        if "reward_model" not in self.models:
            del out["scores"]
        return out


def _grpo(tmp_path, **ppo):
    conventions = ppo.pop("conventions", {})
    return _config(tmp_path, preset=ppo.pop("preset", "grpo"), n_samples_per_prompt=2,
                   conventions=conventions, **ppo)


def test_group_layout_repeats_each_prompt_n_times(tmp_path):
    loop = RecordingPPO(_grpo(tmp_path), tmp_path / "run")
    assert loop.prompt_iterator.batch_size == 2  # 4 rows per generation batch / n = 2
    loop.generate_experience(loop.prompt_iterator.next_batch())
    ids = loop.generated[0]["prompt_ids"]
    assert ids.shape[0] == 4
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids[2], ids[3])
    assert not np.array_equal(ids[1], ids[2])


def test_uniforms_differ_within_a_group_and_are_reproducible(tmp_path):
    first = RecordingPPO(_grpo(tmp_path), tmp_path / "a")
    first.train_iteration()
    u = first.generated[0]["uniforms"]
    assert not np.array_equal(u[0], u[1]) and not np.array_equal(u[2], u[3])
    second = RecordingPPO(_grpo(tmp_path), tmp_path / "b")
    second.train_iteration()
    for a, b in zip(first.generated, second.generated, strict=True):
        np.testing.assert_array_equal(a["uniforms"], b["uniforms"])
    # a resumed run draws iteration 1's numbers as the uninterrupted one does
    first.train_iteration()
    first.save()
    resumed = RecordingPPO(_grpo(tmp_path), tmp_path / "a")
    assert resumed.resume() and resumed.iteration == 2
    uninterrupted = RecordingPPO(_grpo(tmp_path), tmp_path / "c")
    for loop in (resumed, uninterrupted):
        loop.generate_experience(loop.prompt_iterator.next_batch(), iteration=2)
    np.testing.assert_array_equal(resumed.generated[-1]["uniforms"],
                                  uninterrupted.generated[-1]["uniforms"])


def test_critic_free_run_uses_no_critic(tmp_path):
    loop = RecordingPPO(_grpo(tmp_path), tmp_path / "run")
    assert loop.models == ("actor", "reference", "reward_model")
    metrics = loop.train_iteration()  # score returned no values: the loop needs none
    assert metrics["critic_loss"] == 0.0
    for call in loop.calls:
        for rows in call["rows"]:
            assert rows.shape[0] == 2
    entry = loop.run()
    assert entry["models"] == ["actor", "reference", "reward_model"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ppo"]["models"] == ["actor", "reference", "reward_model"]


def test_grpo_advantages_are_per_group(tmp_path):
    loop = RecordingPPO(_grpo(tmp_path), tmp_path / "run")
    exp = loop.generate_experience(loop.prompt_iterator.next_batch())
    scored = loop.with_advantages([exp])
    np.testing.assert_array_equal(scored.values, 0.0)
    expected = grpo_advantages(exp.scores, exp.response_mask, group_size=2)
    np.testing.assert_allclose(scored.advantages, expected, rtol=1e-6, atol=1e-6)
    # each group's valid answers have advantages of opposite sign (a group of two)
    per_row = (scored.advantages * exp.response_mask).sum(1) / np.maximum(
        exp.response_mask.sum(1), 1)
    for i in (0, 2):
        if exp.response_mask[i].any() and exp.response_mask[i + 1].any() \
                and exp.scores[i] != exp.scores[i + 1]:
            assert per_row[i] * per_row[i + 1] < 0


def test_one_sample_per_prompt_gives_no_group_advantage(tmp_path):
    """Identity: a group of one answer has no baseline to beat (GRPO and Dr. GRPO: 0)."""
    for estimator in ("grpo", "dr_grpo"):
        loop = RecordingPPO(_config(tmp_path, preset="grpo", n_samples_per_prompt=1,
                                    conventions={"advantage_estimator": estimator}),
                            tmp_path / estimator)
        exp = loop.with_advantages([loop.generate_experience(loop.prompt_iterator.next_batch())])
        np.testing.assert_array_equal(exp.advantages, 0.0)


def test_rloo_and_reinforce_plus_plus_estimators(tmp_path):
    scores = np.array([1.0, 0.0, 3.0, 1.0], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)
    lp = np.zeros((4, 3), np.float32)
    config = _config(tmp_path, preset="rloo", n_samples_per_prompt=2,
                     conventions={"kl_coef": 0.0})
    out = outcome_advantages(scores, lp, lp, mask, conventions=config.ppo.conventions,
                             kl_coef=0.0, group_size=2)
    # n = 2: A = s - s_other
    np.testing.assert_allclose(out["advantages"][:, 0], [1.0, -1.0, 2.0, -2.0])
    config = _config(tmp_path, preset="reinforce_plus_plus", conventions={"kl_coef": 0.0})
    out = outcome_advantages(scores, lp, lp, mask, conventions=config.ppo.conventions,
                             kl_coef=0.0, group_size=1)
    valid = mask > 0
    np.testing.assert_allclose(out["advantages"][valid].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out["returns"][valid], np.repeat(scores, mask.sum(1).astype(int)))


def _reward_module(tmp_path, monkeypatch, body: str) -> str:
    """A module of reward functions under a name unique to the test (imports are cached)."""
    name = f"critic_free_rewards_{tmp_path.name}".replace("-", "_")
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return name


def test_function_only_reward_loads_no_reward_model(tmp_path, monkeypatch):
    module = _reward_module(tmp_path, monkeypatch, """
        def length(prompt, answer):
            return float(len(answer))
    """)
    config = _grpo(tmp_path, reward_function=f"{module}:length", reward_model_weight=0.0,
                   reward_function_weight=2.0)
    assert models_used(config) == ("actor", "reference", "reward_fn")
    loop = RecordingPPO(config, tmp_path / "run")
    prompts = loop.prompt_iterator.next_batch()
    exp = loop.generate_experience(prompts)
    from shared.evaluation import decode_answers

    answers = decode_answers(loop.tokenizer, exp.response, exp.sample_mask)
    np.testing.assert_array_equal(exp.scores, [2.0 * len(a) for a in answers])


def test_reward_function_is_mixed_with_the_reward_model(tmp_path, monkeypatch):
    module = _reward_module(tmp_path, monkeypatch, """
        def one(prompt, answer):
            return 1.0
    """)
    plain = RecordingPPO(_grpo(tmp_path), tmp_path / "plain")
    mixed = RecordingPPO(_grpo(tmp_path, reward_function=f"{module}:one",
                               reward_model_weight=0.5, reward_function_weight=3.0),
                         tmp_path / "mixed")
    a = plain.generate_experience(plain.prompt_iterator.next_batch())
    b = mixed.generate_experience(mixed.prompt_iterator.next_batch())
    np.testing.assert_allclose(b.scores, 0.5 * a.scores + 3.0, rtol=1e-6)
    assert mixed.models == ("actor", "reference", "reward_model", "reward_fn")


def test_reward_function_errors_name_the_row_and_function(tmp_path, monkeypatch):
    module = _reward_module(tmp_path, monkeypatch, """
        calls = []
        def third_fails(prompt, answer):
            calls.append(prompt)
            if len(calls) == 3:
                raise KeyError("boom")
            return 0.0
        def not_a_number(prompt, answer):
            return "yes"
    """)
    loop = RecordingPPO(_grpo(tmp_path, reward_function=f"{module}:third_fails"),
                        tmp_path / "a")
    with pytest.raises(RunError, match=rf"{module}:third_fails on rollout row 2 \(prompt "
                                       r"'\d+\+\d+=', answer .*KeyError"):
        loop.generate_experience(loop.prompt_iterator.next_batch())
    loop = RecordingPPO(_grpo(tmp_path, reward_function=f"{module}:not_a_number"),
                        tmp_path / "b")
    with pytest.raises(RunError, match=r"not_a_number on rollout row 0 .* returned 'yes'"):
        loop.generate_experience(loop.prompt_iterator.next_batch())
    with pytest.raises(RunError, match=rf"{module}:missing.*no callable 'missing'"):
        RecordingPPO(_grpo(tmp_path, reward_function=f"{module}:missing"), tmp_path / "c")
    with pytest.raises(RunError, match="cannot import module 'no_such_module_xyz'"):
        RecordingPPO(_grpo(tmp_path, reward_function="no_such_module_xyz:f"), tmp_path / "d")


def test_arithmetic_reward():
    assert arithmetic_reward("12+7=", "19") == 1.0
    assert arithmetic_reward("12+7=", "18") == 0.0
    assert arithmetic_reward("12+7=", "19 ") == 0.0
    with pytest.raises(ValueError, match="not an addition prompt"):
        arithmetic_reward("hello", "19")


def test_tis_with_identical_logprobs_is_no_correction(tmp_path):
    """Identity: sampler and trainer agree, so TIS weights are exactly 1 and MIS keeps every
    token; the weights reach the training step's micro-batches only under TIS."""
    class Agreeing(RecordingPPO):
        def generate(self, prompt_ids, prompt_mask, uniforms):
            tokens, mask, _ = super().generate(prompt_ids, prompt_mask, uniforms)
            scored = NumpyPPO.score(self, prompt_ids, prompt_mask, tokens, mask)
            return tokens, mask, scored["logprobs"]

    plain = Agreeing(_config(tmp_path), tmp_path / "plain")
    plain.w = 0.0
    base = plain.with_advantages([plain.generate_experience(plain.prompt_iterator.next_batch())])
    assert base.importance_weights is None
    for mode in ("tis", "mis"):
        loop = Agreeing(_config(tmp_path, conventions={"rollout_correction": mode}),
                        tmp_path / mode)
        exp = loop.with_advantages([loop.generate_experience(loop.prompt_iterator.next_batch())])
        np.testing.assert_array_equal(exp.response_mask, base.response_mask)
        np.testing.assert_array_equal(exp.advantages, base.advantages)
        if mode == "tis":
            np.testing.assert_array_equal(exp.importance_weights[exp.response_mask > 0], 1.0)
            assert "importance_weights" in exp.train_arrays(np.arange(2))
        else:
            assert exp.importance_weights is None


def test_tis_weights_and_mis_mask_follow_the_gap(tmp_path):
    tis = RecordingPPO(_config(tmp_path, conventions={"rollout_correction": "tis",
                                                      "rollout_correction_threshold": 1.5}),
                       tmp_path / "tis")
    exp = tis.with_advantages([tis.generate_experience(tis.prompt_iterator.next_batch())])
    rho = np.exp(exp.logprobs - exp.sample_logprobs)
    valid = exp.response_mask > 0
    np.testing.assert_allclose(exp.importance_weights[valid], np.minimum(rho, 1.5)[valid],
                               rtol=1e-5)
    mis = RecordingPPO(_config(tmp_path, conventions={"rollout_correction": "mis",
                                                      "rollout_correction_threshold": 1.5}),
                       tmp_path / "mis")
    exp = mis.with_advantages([mis.generate_experience(mis.prompt_iterator.next_batch())])
    keep = (rho >= 1 / 1.5) & (rho <= 1.5)
    before = (exp.sample_mask > 0) & ~exp.is_short[:, None]
    np.testing.assert_array_equal(exp.response_mask > 0, before & keep)
    assert (before & ~keep).any()  # some tokens were dropped
    # the metrics say how much each correction acted
    tis_metrics = tis.train_iteration()
    assert 0 < tis_metrics["tis_weight_mean"] <= 1.5 and "mis_kept_fraction" not in tis_metrics
    mis_metrics = mis.train_iteration()
    assert 0 < mis_metrics["mis_kept_fraction"] < 1 and "tis_weight_mean" not in mis_metrics


@pytest.mark.parametrize(("ppo", "message"), [
    ({"n_samples_per_prompt": 3}, r"n_samples_per_prompt: 3 does not divide "
                                  r"per_device_generation_batch_size=4"),
    ({"n_samples_per_prompt": 0}, r"n_samples_per_prompt: 0 is invalid"),
    ({"preset": "rloo"}, r"n_samples_per_prompt: 1 is invalid with .*rloo; must be >= 2"),
    ({"reward_model_weight": 0.0}, r"reward_model_weight: 0 is invalid without a "
                                   r"reward_function"),
    ({"reward_function": "no colon"}, r"reward_function: 'no colon' is invalid; must be "
                                      r"'module:function'"),
    ({"reward_function_weight": -1.0}, r"reward_function_weight: -1.0 is invalid"),
    ({"conventions": {"advantage_estimator": "ppo2"}},
     r"advantage_estimator = 'ppo2' is not allowed; allowed values: \['gae', 'grpo', "
     r"'dr_grpo', 'rloo', 'reinforce_plus_plus'\]"),
    ({"preset": "grpo", "n_samples_per_prompt": 2, "critic": {"url": "http://h:5557"}},
     r"critic.url: 'http://h:5557' is invalid with conventions.advantage_estimator grpo"),
    ({"conventions": {"policy_loss": "cispo"}}, r"allowed values: \['ppo', 'gspo'\]"),
    ({"conventions": {"rollout_correction": "is"}},
     r"allowed values: \['none', 'tis', 'mis'\]"),
    ({"conventions": {"rollout_correction_threshold": 1.0}},
     r"rollout_correction_threshold = 1.0 is not allowed; expected a finite number > 1"),
])
def test_config_refuses(tmp_path, ppo, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        _config(tmp_path, **ppo)
