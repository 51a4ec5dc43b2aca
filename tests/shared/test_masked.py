import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import masked_mean, masked_sum, masked_var, masked_whiten

X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -8.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]  # valid: 1, 2, 3, 4, 5


def test_masked_sum_and_mean_golden(run):
    x, m = run.asarray(X), run.asarray(MASK)
    assert run.call(masked_sum, x, m) == pytest.approx(15.0)
    assert run.call(masked_mean, x, m, eager=True) == pytest.approx(3.0)  # 15 / 5
    np.testing.assert_allclose(run.call(masked_mean, x, m, axis=-1), [2.0, 4.5])


def test_bool_mask_same_as_float(run):
    x = run.asarray(X)
    b = run.asarray(np.asarray(MASK) > 0)
    assert run.call(masked_mean, x, b) == pytest.approx(3.0)


def test_masked_var_golden(run):
    x, m = run.asarray(X), run.asarray(MASK)
    # Values 1..5: sum of squared deviations 10 -> biased 2.0, unbiased 2.5.
    assert run.call(masked_var, x, m, unbiased=False) == pytest.approx(2.0)
    assert run.call(masked_var, x, m) == pytest.approx(2.5)
    # Per row: (1, 2, 3) unbiased var 1; (4, 5) unbiased var 0.5.
    np.testing.assert_allclose(run.call(masked_var, x, m, axis=-1), [1.0, 0.5])


def test_empty_mask_gives_zero_not_nan(run):
    x, m = run.asarray(X), run.asarray(np.zeros((2, 4)))
    assert run.call(masked_mean, x, m) == 0.0
    assert run.call(masked_var, x, m) == 0.0


def test_masked_whiten_golden(run):
    x, m = run.asarray(X), run.asarray(MASK)
    out = run.call(masked_whiten, x, m, eps=0.0)
    # (x - 3) / sqrt(2.5) on the valid entries, 0 elsewhere (TRL masked_whiten form).
    s = np.sqrt(2.5)
    np.testing.assert_allclose(
        out, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], rtol=1e-12, atol=1e-15
    )
    kept = run.call(masked_whiten, x, m, shift_mean=False, eps=0.0)
    np.testing.assert_allclose(kept[0, :3], [3 - 2 / s, 3 - 1 / s, 3.0], rtol=1e-12)


def test_garbage_in_padding_never_leaks(run):
    x = run.asarray([[1.0, np.nan], [np.inf, 2.0]])
    m = run.asarray([[1.0, 0.0], [0.0, 1.0]])
    assert run.call(masked_mean, x, m) == pytest.approx(1.5)
    assert np.isfinite(run.call(masked_whiten, x, m)).all()


def test_shape_mismatch_names_argument(run):
    with pytest.raises(ValueError, match="mask"):
        masked_mean(run.asarray(X), run.asarray([1.0, 0.0]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=2, max_size=12),
    st.integers(1, 5),
    st.floats(-1e6, 1e6),
)
def test_whiten_ignores_padding(values, pad, garbage):
    x = np.asarray([values])
    m = np.ones_like(x)
    padded_x = np.concatenate([x, np.full((1, pad), garbage)], axis=1)
    padded_m = np.concatenate([m, np.zeros((1, pad))], axis=1)
    np.testing.assert_allclose(
        masked_whiten(padded_x, padded_m)[:, : x.shape[1]], masked_whiten(x, m), atol=1e-9
    )
