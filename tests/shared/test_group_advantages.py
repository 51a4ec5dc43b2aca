import numpy as np
import pytest

from shared import (
    discounted_returns,
    grpo_advantages,
    masked_whiten,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_returns,
    remax_advantages,
    rloo_advantages,
    whitening_moments,
)

# Two prompts, n = 2 answers each: rows 0-1 answer prompt 0, rows 2-3 answer prompt 1.
SCORES = [1.0, 3.0, 2.0, 2.0]
MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_grpo_golden(run):
    # Group 0: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2); group 1: std 0.
    out = run.call(grpo_advantages, run.asarray(SCORES), run.asarray(MASK), group_size=2,
                   eps=1e-6)
    a = 1.0 / (np.sqrt(2.0) + 1e-6)
    np.testing.assert_allclose(out, [[-a, -a, 0], [a, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=1e-12)


def test_dr_grpo_is_mean_centred(run):
    out = run.call(grpo_advantages, run.asarray(SCORES), run.asarray(MASK), group_size=2,
                   scale_by_std=False)
    np.testing.assert_allclose(out, [[-1, -1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_grpo_one_sample_per_prompt_gives_zeros(run, scale_by_std):
    out = run.call(grpo_advantages, run.asarray(SCORES), run.asarray(MASK), group_size=1,
                   scale_by_std=scale_by_std)
    np.testing.assert_array_equal(out, np.zeros((4, 3)))


def test_rloo_n2_hand_computed(run):
    # n = 2: the baseline is the other answer's score. A = (1 - 3, 3 - 1, 2 - 2, 2 - 2).
    out = run.call(rloo_advantages, run.asarray(SCORES), run.asarray(MASK), group_size=2)
    np.testing.assert_allclose(out, [[-2, -2, 0], [2, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_rloo_is_scaled_dr_grpo(run):
    rng = np.random.default_rng(0)
    scores, mask = run.asarray(rng.normal(size=6)), run.asarray(np.ones((6, 2)))
    rloo = run.call(rloo_advantages, scores, mask, group_size=3)
    dr = run.call(grpo_advantages, scores, mask, group_size=3, scale_by_std=False)
    np.testing.assert_allclose(rloo, 1.5 * dr, rtol=1e-12)  # n / (n - 1)


def test_remax_golden(run):
    out = run.call(remax_advantages, run.asarray([1.0, 0.5]), run.asarray([0.25, 1.0]),
                   run.asarray([[1.0, 1.0], [1.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.75, 0.75], [-0.5, 0.0]])


def test_reinforce_plus_plus_returns_golden(run):
    # r - 0.5 kl = (-0.05, -0.1, 0.95); gamma 1: G = (0.8, 0.85, 0.95).
    rewards = run.asarray([[0.0, 0.0, 1.0, 0.0]])
    kl = run.asarray([[0.1, 0.2, 0.1, 9.0]])
    mask = run.asarray([[1.0, 1.0, 1.0, 0.0]])
    out = run.call(reinforce_plus_plus_returns, rewards, mask, gamma=1.0, kl=kl, kl_coef=0.5)
    np.testing.assert_allclose(out, [[0.8, 0.85, 0.95, 0.0]], rtol=1e-12)


def test_reinforce_plus_plus_is_whitened_returns(run):
    rng = np.random.default_rng(1)
    rewards, mask = rng.normal(size=(3, 4)), np.array(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], float)
    out = run.call(reinforce_plus_plus_advantages, run.asarray(rewards), run.asarray(mask),
                   gamma=0.9)
    expected = masked_whiten(discounted_returns(rewards, mask, gamma=0.9), mask)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_reinforce_plus_plus_split_with_global_moments(run):
    """Shards whitened with the summed moments equal the full batch whitened at once."""
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(4, 5))
    mask = (np.arange(5)[None, :] < np.array([5, 3, 1, 4])[:, None]).astype(float)
    full = reinforce_plus_plus_advantages(rewards, mask, gamma=0.95)
    moments = sum(
        whitening_moments(reinforce_plus_plus_returns(r, m, gamma=0.95), m)
        for r, m in ((rewards[:2], mask[:2]), (rewards[2:], mask[2:]))
    )
    def shard(r, m, mo):
        return reinforce_plus_plus_advantages(r, m, gamma=0.95, moments=mo)

    parts = [
        run.call(shard, run.asarray(r), run.asarray(m), run.asarray(moments))
        for r, m in ((rewards[:2], mask[:2]), (rewards[2:], mask[2:]))
    ]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-10, atol=1e-12)


def test_group_errors(run):
    mask = run.asarray(np.ones((3, 2)))
    with pytest.raises(ValueError, match="whole groups"):
        grpo_advantages(run.asarray([1.0, 2.0, 3.0]), mask, group_size=2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(run.asarray([1.0, 2.0, 3.0]), mask, group_size=1)
    with pytest.raises(ValueError, match="rows"):
        grpo_advantages(run.asarray([1.0, 2.0]), mask, group_size=1)
