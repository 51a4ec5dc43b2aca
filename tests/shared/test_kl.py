import math

import numpy as np
import pytest

from shared import kl_penalty

LN2 = math.log(2.0)
# p = log pi, q = log pi_ref. Column 0: pi = 1/2, pi_ref = 1/4; column 1: the reverse.
P = [[math.log(0.5), math.log(0.25)]]
Q = [[math.log(0.25), math.log(0.5)]]


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [LN2, -LN2]),  # p - q
        ("abs", [LN2, LN2]),  # |p - q|
        ("k2", [0.5 * LN2**2, 0.5 * LN2**2]),  # (p - q)^2 / 2
        # exp(q - p) - (q - p) - 1: 1/2 + ln 2 - 1 and 2 - ln 2 - 1 (Schulman's k3).
        ("k3", [0.5 + LN2 - 1.0, 2.0 - LN2 - 1.0]),
    ],
)
def test_kl_estimators_golden(run, estimator, expected):
    out = run.call(kl_penalty, run.asarray(P), run.asarray(Q), estimator=estimator)
    np.testing.assert_allclose(out, [expected], rtol=1e-12)


def test_kl_clamp(run):
    out = run.call(kl_penalty, run.asarray(P), run.asarray(Q), estimator="k1", clamp=0.5)
    np.testing.assert_allclose(out, [[0.5, -0.5]])


def test_k3_is_nonnegative_and_zero_at_equality(run):
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    out = run.call(kl_penalty, run.asarray(p), run.asarray(q), estimator="k3")
    assert (out >= 0).all()
    same = run.call(kl_penalty, run.asarray(p), run.asarray(p), estimator="k3")
    np.testing.assert_allclose(same, 0.0, atol=1e-15)


def test_kl_errors(run):
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(run.asarray(P), run.asarray(Q), estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_penalty(run.asarray(P), run.asarray([[0.0]]), estimator="k1")
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(run.asarray(P), run.asarray(Q), estimator="k1", clamp=0.0)
