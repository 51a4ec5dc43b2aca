import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import episode_mask, score_position, shape_rewards

MASK = [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
# k1 = logprobs - ref_logprobs per token (ref = 0 here).
LOGP = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.1, 0.1, 0.1, 0.1]]
SCORES = [2.0, -7.0, 3.0]


def test_score_position_golden(run):
    mask = run.asarray(MASK)
    # last_token: last index with mask 1 (0 for the empty row).
    np.testing.assert_array_equal(run.call(score_position, mask, position="last_token"), [1, 3, 0])
    # dschat: min(sum(mask), T - 1): one past the end, clipped for the full row.
    np.testing.assert_array_equal(run.call(score_position, mask, position="dschat"), [2, 3, 0])


def test_episode_mask(run):
    mask = run.asarray(MASK)
    np.testing.assert_array_equal(run.call(episode_mask, mask, position="last_token"), MASK)
    np.testing.assert_array_equal(
        run.call(episode_mask, mask, position="dschat"),
        [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
    )


def _shape(run, **kwargs):
    return run.call(
        shape_rewards,
        run.asarray(SCORES),
        run.asarray(LOGP),
        run.asarray(np.zeros((3, 4))),
        run.asarray(MASK),
        **{"kl_coef": 0.5, "reward_clip": 5.0, **kwargs},
    )


def test_shape_rewards_last_token(run):
    rewards, kl = _shape(run, position="last_token", eager=True)
    # -0.5 * kl on valid tokens; score (clipped to +-5) at the last valid token.
    np.testing.assert_allclose(
        rewards,
        [[-0.05, -0.1 + 2.0, 0, 0], [-0.25, -0.3, -0.35, -0.4 - 5.0], [0, 0, 0, 0]],
        rtol=1e-12,
        atol=1e-15,
    )
    np.testing.assert_allclose(kl, np.asarray(LOGP) * np.asarray(MASK))


def test_shape_rewards_dschat_zero_after_end(run):
    # DeepSpeed-Chat: KL kept up to and including n (a padding slot), score at n.
    rewards, _ = _shape(run, position="dschat", zero_after_end=True)
    np.testing.assert_allclose(
        rewards,
        [[-0.05, -0.1, -0.15 + 2.0, 0], [-0.25, -0.3, -0.35, -0.4 - 5.0], [-0.05 + 3.0, 0, 0, 0]],
        rtol=1e-12,
        atol=1e-15,
    )


def test_shape_rewards_dschat_masked_kl(run):
    # TRL: score one past the end, but no KL on padding.
    rewards, _ = _shape(run, position="dschat", zero_after_end=False, reward_clip=None)
    np.testing.assert_allclose(
        rewards,
        [[-0.05, -0.1, 2.0, 0], [-0.25, -0.3, -0.35, -0.4 - 7.0], [3.0, 0, 0, 0]],
        rtol=1e-12,
        atol=1e-15,
    )


def test_shape_rewards_array_kl_coef_and_zero(run):
    coef = run.asarray(0.5)
    rewards, _ = _shape(run, kl_coef=coef)
    assert rewards[0, 1] == pytest.approx(1.9)
    rewards, kl = _shape(run, kl_coef=0.0)  # KL-as-loss mode: rewards are the scores only
    np.testing.assert_allclose(rewards, [[0, 2, 0, 0], [0, 0, 0, -5], [0, 0, 0, 0]])
    assert kl[1, 3] == pytest.approx(0.8)


def test_shape_rewards_errors(run):
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(
            run.asarray([1.0]), run.asarray(LOGP), run.asarray(LOGP), run.asarray(MASK),
            kl_coef=0.1,
        )
    with pytest.raises(ValueError, match="position"):
        score_position(run.asarray(MASK), position="first")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=4),
    st.integers(1, 3),
    st.floats(-30, 30),
    st.sampled_from(["k1", "abs", "k2", "k3"]),
)
def test_last_token_rewards_ignore_padding(lengths, pad, garbage, estimator):
    rng = np.random.default_rng(len(lengths))
    b, t = len(lengths), 5
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(float)
    lp, ref, scores = rng.normal(size=(b, t)), rng.normal(size=(b, t)), rng.normal(size=b)
    extra = np.full((b, pad), garbage)
    kwargs = {"kl_coef": 0.1, "kl_estimator": estimator, "reward_clip": 1.0}
    base = shape_rewards(scores, lp, ref, mask, **kwargs)
    padded = shape_rewards(
        scores,
        np.concatenate([lp, extra], 1),
        np.concatenate([ref, -extra], 1),
        np.concatenate([mask, np.zeros((b, pad))], 1),
        **kwargs,
    )
    for x, y in zip(base, padded, strict=True):
        np.testing.assert_allclose(y[:, :t], x, rtol=1e-12)
        np.testing.assert_array_equal(y[:, t:], 0.0)
