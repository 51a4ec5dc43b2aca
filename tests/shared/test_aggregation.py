import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import aggregate_loss, loss_normalizer
from shared.aggregation import AGG_MODES

LOSS = [[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 10.0 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),  # row means 2 and 4
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),  # row sums 6 and 4
        ("seq-mean-token-sum-norm", 10.0 / (2 * 3)),  # Dr. GRPO: sum / (rows * T)
    ],
)
def test_aggregate_golden(run, mode, expected):
    out = run.call(aggregate_loss, run.asarray(LOSS), run.asarray(MASK), mode=mode)
    assert out == pytest.approx(expected)


def test_normalizer_counts(run):
    mask = run.asarray([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert run.call(loss_normalizer, mask, mode="token-mean") == 3.0
    # The all-padding row is not a sequence.
    assert run.call(loss_normalizer, mask, mode="seq-mean-token-mean") == 2.0


def test_explicit_normalizer(run):
    out = run.call(
        aggregate_loss, run.asarray(LOSS), run.asarray(MASK), mode="token-mean", normalizer=8.0
    )
    assert out == pytest.approx(10.0 / 8)


def test_bad_mode(run):
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(run.asarray(LOSS), run.asarray(MASK), mode="sum")


def _batch(data):
    rows = data.draw(st.integers(2, 6))
    cols = data.draw(st.integers(1, 5))
    loss = np.asarray(
        data.draw(st.lists(st.floats(-10, 10), min_size=rows * cols, max_size=rows * cols))
    ).reshape(rows, cols)
    lengths = data.draw(st.lists(st.integers(0, cols), min_size=rows, max_size=rows))
    mask = (np.arange(cols)[None, :] < np.asarray(lengths)[:, None]).astype(float)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, rows - 1), max_size=3))))
    return loss, mask, cuts


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(AGG_MODES))
def test_split_invariance(data, mode):
    """Summing micro-batch losses with the global normaliser gives the full-batch loss."""
    loss, mask, cuts = _batch(data)
    total = loss_normalizer(mask, mode=mode)
    full = aggregate_loss(loss, mask, mode=mode, normalizer=total)
    parts = sum(
        aggregate_loss(lp, mp, mode=mode, normalizer=total)
        for lp, mp in zip(np.split(loss, cuts), np.split(mask, cuts), strict=True)
    )
    np.testing.assert_allclose(parts, full, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(AGG_MODES))
def test_split_invariance_torch_gradients(data, mode):
    torch = pytest.importorskip("torch")
    loss_np, mask_np, cuts = _batch(data)
    mask = torch.asarray(mask_np)
    total = loss_normalizer(mask, mode=mode)

    full_in = torch.asarray(loss_np, requires_grad=True)
    aggregate_loss(full_in, mask, mode=mode, normalizer=total).backward()

    split_in = torch.asarray(loss_np, requires_grad=True)
    parts = sum(
        aggregate_loss(lp, mp, mode=mode, normalizer=total)
        for lp, mp in zip(
            torch.tensor_split(split_in, cuts), torch.tensor_split(mask, cuts), strict=True
        )
    )
    parts.backward()
    np.testing.assert_allclose(split_in.grad.numpy(), full_in.grad.numpy(), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from(AGG_MODES[:3]), st.integers(1, 3), st.floats(-1e3, 1e3))
def test_padding_columns_never_change_the_loss(data, mode, pad, garbage):
    loss, mask, _ = _batch(data)
    padded_loss = np.concatenate([loss, np.full((loss.shape[0], pad), garbage)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((mask.shape[0], pad))], axis=1)
    np.testing.assert_allclose(
        aggregate_loss(padded_loss, padded_mask, mode=mode),
        aggregate_loss(loss, mask, mode=mode),
        rtol=1e-12,
        atol=1e-12,
    )
