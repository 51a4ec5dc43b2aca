import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import discounted_returns, gae_advantages

MODES = ["zero_after_end", "skip_masked"]


@pytest.mark.parametrize("mode", MODES)
def test_gae_golden_full_row(run, mode):
    # Hand-computed, gamma 0.9, lam 0.8 (gamma * lam = 0.72), values 0.5:
    # t=2: delta = 1 - 0.5 = 0.5, A = 0.5
    # t=1: delta = 0.9 * 0.5 - 0.5 = -0.05, A = -0.05 + 0.72 * 0.5 = 0.31
    # t=0: delta = -0.05, A = -0.05 + 0.72 * 0.31 = 0.1732
    adv, ret = run.call(
        gae_advantages,
        run.asarray([[0.0, 0.0, 1.0]]),
        run.asarray([[0.5, 0.5, 0.5]]),
        run.asarray([[1.0, 1.0, 1.0]]),
        gamma=0.9,
        lam=0.8,
        mask_mode=mode,
        eager=True,
    )
    np.testing.assert_allclose(adv, [[0.1732, 0.31, 0.5]], rtol=1e-12)
    np.testing.assert_allclose(ret, [[0.6732, 0.81, 1.0]], rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gae_golden_padded_row(run, mode):
    # Mask (1, 1, 0); the padding slot's 9s are garbage. Next value after t=1 is 0:
    # t=1: delta = 1 - 0.5 = 0.5 = A; t=0: delta = 0.45 - 0.5 = -0.05, A = -0.05 + 0.36.
    adv, ret = run.call(
        gae_advantages,
        run.asarray([[0.0, 1.0, 9.0]]),
        run.asarray([[0.5, 0.5, 9.0]]),
        run.asarray([[True, True, False]]),
        gamma=0.9,
        lam=0.8,
        mask_mode=mode,
    )
    np.testing.assert_allclose(adv, [[0.31, 0.5, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(ret, [[0.81, 1.0, 0.0]], rtol=1e-12)


def test_gae_interior_hole_modes_differ(run):
    rewards = run.asarray([[0.0, 9.0, 1.0]])
    values = run.asarray([[0.5, 9.0, 0.5]])
    mask = run.asarray([[1.0, 0.0, 1.0]])
    # skip_masked (verl/Tunix): the hole is skipped, so t=0 sees v_2 = 0.5, A_2 = 0.5:
    # A_0 = (0.9 * 0.5 - 0.5) + 0.72 * 0.5 = 0.31.
    adv, _ = run.call(gae_advantages, rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv, [[0.31, 0.0, 0.5]], rtol=1e-12)
    # zero_after_end: the hole is a zero-reward, zero-value step:
    # A_1 = 0.9 * 0.5 + 0.72 * 0.5 = 0.81; A_0 = -0.5 + 0.72 * 0.81 = 0.0832.
    adv, _ = run.call(
        gae_advantages, rewards, values, mask, gamma=0.9, lam=0.8, mask_mode="zero_after_end"
    )
    np.testing.assert_allclose(adv, [[0.0832, 0.0, 0.5]], rtol=1e-12)


def test_discounted_returns_golden(run):
    # G_2 = 1, G_1 = 2 + 0.5 * 1 = 2.5, G_0 = 0 + 0.5 * 2.5 = 1.25; padding ignored.
    out = run.call(
        discounted_returns,
        run.asarray([[0.0, 2.0, 1.0, 7.0]]),
        run.asarray([[1.0, 1.0, 1.0, 0.0]]),
        gamma=0.5,
    )
    np.testing.assert_allclose(out, [[1.25, 2.5, 1.0, 0.0]])


def test_gae_errors(run):
    x = run.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask_mode"):
        gae_advantages(x, x, x, gamma=1.0, lam=1.0, mask_mode="none")
    with pytest.raises(ValueError, match="values"):
        gae_advantages(x, run.asarray(np.zeros((2, 2))), x, gamma=1.0, lam=1.0)


def _episode(data, prefix):
    b = data.draw(st.integers(1, 4))
    t = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if prefix:
        lengths = rng.integers(0, t + 1, size=b)
        mask = np.arange(t)[None] < lengths[:, None]
    else:
        mask = rng.random((b, t)) < 0.7
    return rng.normal(size=(b, t)), rng.normal(size=(b, t)), mask, data.draw(st.floats(0, 1))


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from([("skip_masked", False), ("zero_after_end", True)]))
def test_gae_lambda_one_is_returns_minus_values(data, mode_prefix):
    """rlax identity: GAE with lam = 1 equals discounted returns minus values."""
    mode, prefix = mode_prefix
    rewards, values, mask, gamma = _episode(data, prefix)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=1.0, mask_mode=mode)
    returns = discounted_returns(rewards, mask, gamma=gamma)
    np.testing.assert_allclose(adv, np.where(mask, returns - values, 0.0), atol=1e-10)
    np.testing.assert_allclose(ret, returns, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(MODES))
def test_gae_lambda_zero_is_td_error(data, mode):
    """lam = 0 gives the one-step TD error r_t + gamma v_{t+1} - v_t (v after the end = 0)."""
    rewards, values, mask, gamma = _episode(data, prefix=True)
    adv, _ = gae_advantages(rewards, values, mask, gamma=gamma, lam=0.0, mask_mode=mode)
    next_values = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((len(values), 1))], 1)
    td = rewards + gamma * next_values - values
    np.testing.assert_allclose(adv, np.where(mask, td, 0.0), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(MODES), st.integers(1, 3), st.floats(-1e3, 1e3))
def test_gae_padding_never_changes_result(data, mode, pad, garbage):
    rewards, values, mask, gamma = _episode(data, prefix=True)
    b = len(rewards)
    extra = np.full((b, pad), garbage)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=0.9, mask_mode=mode)
    adv_p, ret_p = gae_advantages(
        np.concatenate([rewards, extra], 1),
        np.concatenate([values, extra], 1),
        np.concatenate([mask, np.zeros((b, pad), bool)], 1),
        gamma=gamma,
        lam=0.9,
        mask_mode=mode,
    )
    t = rewards.shape[1]
    np.testing.assert_allclose(adv_p[:, :t], adv, atol=1e-12)
    np.testing.assert_allclose(ret_p[:, :t], ret, atol=1e-12)
