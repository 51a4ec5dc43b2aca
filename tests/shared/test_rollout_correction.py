import math

import numpy as np
import pytest

from shared import mis_mask, policy_loss, rollout_logprob_gap, tis_weights

# delta = train - rollout = (ln 3, -ln 4, 0.05 | garbage in padding).
ROLL = [[-1.0, -0.5, -2.0, 0.0]]
TRAIN = [[-1.0 + math.log(3.0), -0.5 - math.log(4.0), -1.95, 50.0]]
MASK = [[1.0, 1.0, 1.0, 0.0]]


def test_tis_token_golden(run):
    w = run.call(tis_weights, run.asarray(TRAIN), run.asarray(ROLL), run.asarray(MASK),
                 threshold=2.0, eager=True)
    np.testing.assert_allclose(w, [[2.0, 0.25, math.exp(0.05), 0.0]], rtol=1e-12)


@pytest.mark.parametrize("level, log_rho", [
    ("sequence", math.log(3.0) - math.log(4.0) + 0.05),  # product of the token ratios
    ("geometric", (math.log(3.0) - math.log(4.0) + 0.05) / 3),  # geometric mean
])
def test_tis_sequence_levels(run, level, log_rho):
    w = run.call(tis_weights, run.asarray(TRAIN), run.asarray(ROLL), run.asarray(MASK),
                 threshold=2.0, level=level)
    np.testing.assert_allclose(w, [[math.exp(log_rho)] * 3 + [0.0]], rtol=1e-12)


def test_mis_token_golden(run):
    # ratios 3, 1/4, e^0.05 against [1/2, 2]: only the last valid token is kept.
    keep = run.call(mis_mask, run.asarray(TRAIN), run.asarray(ROLL), run.asarray(MASK),
                    threshold=2.0)
    np.testing.assert_array_equal(keep, [[0.0, 0.0, 1.0, 0.0]])
    keep = run.call(mis_mask, run.asarray(TRAIN), run.asarray(ROLL), run.asarray(MASK),
                    threshold=4.0, threshold_low=0.2)
    np.testing.assert_array_equal(keep, [[1.0, 1.0, 1.0, 0.0]])
    # Sequence level: the product 3/4 e^0.05 ~ 0.79 is inside [1/2, 2]: the whole row kept.
    keep = run.call(mis_mask, run.asarray(TRAIN), run.asarray(ROLL), run.asarray(MASK),
                    threshold=2.0, level="sequence")
    np.testing.assert_array_equal(keep, [[1.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_identical_logprobs_no_correction(run, level):
    rng = np.random.default_rng(0)
    lp = run.asarray(-np.abs(rng.normal(size=(3, 5))))
    mask = run.asarray((np.arange(5)[None, :] < np.array([5, 2, 0])[:, None]).astype(float))
    w = run.call(tis_weights, lp, lp, mask, level=level)
    keep = run.call(mis_mask, lp, lp, mask, level=level)
    m = np.asarray((np.arange(5)[None, :] < np.array([5, 2, 0])[:, None]), float)
    np.testing.assert_array_equal(w, m)  # exactly 1 on every valid token
    np.testing.assert_array_equal(keep, m)  # nothing masked
    gap = run.call(rollout_logprob_gap, lp, lp, mask)
    for key in ("max_abs_diff", "mean_abs_diff", "k3_kl", "fraction_beyond"):
        assert gap[key] == 0.0
    assert gap["rollout_ppl_ratio"] == 1.0


def test_gap_metrics_golden(run):
    gap = run.call(rollout_logprob_gap, run.asarray(TRAIN), run.asarray(ROLL),
                   run.asarray(MASK), threshold=0.1)
    d = np.array([math.log(3.0), -math.log(4.0), 0.05])
    np.testing.assert_allclose(gap["max_abs_diff"], math.log(4.0), rtol=1e-12)
    np.testing.assert_allclose(gap["mean_abs_diff"], np.abs(d).mean(), rtol=1e-12)
    np.testing.assert_allclose(gap["k3_kl"], np.mean(np.exp(d) - d - 1.0), rtol=1e-12)
    np.testing.assert_allclose(gap["fraction_beyond"], 2.0 / 3.0, rtol=1e-12)
    np.testing.assert_allclose(gap["rollout_ppl_ratio"], np.exp(d.mean()), rtol=1e-12)


def test_tis_weights_scale_the_policy_loss(run):
    def weighted(lp, adv, mask, w):
        return policy_loss(lp, lp, adv, mask, clip_low=0.2, importance_weights=w)[0]

    # ratio 1: per-token losses -A = (-1, 2), weighted (-0.5, 4), token-mean 1.75.
    out = run.call(weighted, run.asarray([[-1.0, -2.0]]), run.asarray([[1.0, -2.0]]),
                   run.asarray([[1.0, 1.0]]), run.asarray([[0.5, 2.0]]))
    np.testing.assert_allclose(out, 1.75, rtol=1e-12)


def test_errors(run):
    x = run.asarray([[0.0, 0.0]])
    with pytest.raises(ValueError, match="level"):
        tis_weights(x, x, x, level="row")
    with pytest.raises(ValueError, match="threshold"):
        mis_mask(x, x, x, threshold=1.0)
    with pytest.raises(ValueError, match="threshold_low"):
        mis_mask(x, x, x, threshold=2.0, threshold_low=3.0)
