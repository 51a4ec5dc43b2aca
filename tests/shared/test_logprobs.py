import math

import numpy as np
import pytest

from shared import entropy_from_logits, token_logprobs


def test_token_logprobs_golden(run):
    # Row 0: logits (0, 0) -> p = (1/2, 1/2). Row 1: logits (log 1, log 3) -> p = (1/4, 3/4).
    logits = run.asarray([[[0.0, 0.0], [math.log(1.0), math.log(3.0)]]])
    labels = run.asarray([[1, 1]])
    out = run.call(token_logprobs, logits, labels, eager=True)
    np.testing.assert_allclose(out, [[math.log(0.5), math.log(0.75)]], rtol=1e-12)


def test_token_logprobs_matches_log_softmax_gather(run):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)) * 5
    labels = rng.integers(0, 7, size=(2, 3))
    # Reference: explicit log_softmax, then gather (DeepSpeed-Chat gather_log_probs).
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    out = run.call(token_logprobs, run.asarray(logits), run.asarray(labels))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_token_logprobs_stable_for_huge_logits(run):
    logits = run.asarray([[[1e4, 0.0, -1e4]]])
    out = run.call(token_logprobs, logits, run.asarray([[1]]))
    np.testing.assert_allclose(out, [[-1e4]])  # log softmax: 0 - 1e4 - log(1 + ...)


def test_token_logprobs_clips_ignore_index(run):
    logits = run.asarray([[[0.0, 0.0]]])
    out = run.call(token_logprobs, logits, run.asarray([[-100]]))
    assert np.isfinite(out).all()


def test_token_logprobs_shape_errors(run):
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(run.asarray(np.zeros((2, 3))), run.asarray(np.zeros((2, 3), int)))
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(run.asarray(np.zeros((2, 3, 4))), run.asarray(np.zeros((2, 2), int)))
    with pytest.raises(ValueError, match="labels must have dtype kind .integral."):
        token_logprobs(run.asarray(np.zeros((2, 3, 4))), run.asarray(np.zeros((2, 3))))


def test_entropy_golden(run):
    # Uniform over 2: log 2. p = (1/4, 3/4): -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446.
    logits = run.asarray([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    out = run.call(entropy_from_logits, logits)
    np.testing.assert_allclose(out, [[math.log(2.0), 0.5623351446188083]], rtol=1e-12)


def test_entropy_rank_error(run):
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(run.asarray(np.zeros((2, 3))))


def test_torch_native_logsumexp_equals_generic_reference():
    """`shared._array.logsumexp` uses torch.logsumexp under torch (a backend fast path); it
    must give the generic array-API formula's values and gradients, -inf entries and rows
    included."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    from shared._array import generic_logsumexp, logsumexp

    xp = array_api_compat.array_namespace(torch.zeros(1))
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 5, 11)) * 20
    x[0, 1, :4] = -np.inf  # some entries masked
    x[1, 2, :] = -np.inf  # a whole row masked
    x[2, 0, 3] = 1e4  # one huge logit
    for dtype in (torch.float64, torch.float32):
        native_in = torch.tensor(x, dtype=dtype, requires_grad=True)
        generic_in = torch.tensor(x, dtype=dtype, requires_grad=True)
        native = logsumexp(xp, native_in, axis=-1)
        generic = generic_logsumexp(xp, generic_in, axis=-1)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(native, generic, rtol=tol, atol=tol)
        assert torch.isneginf(native[1, 2])
        weights = torch.tensor(rng.normal(size=native.shape), dtype=dtype)
        finite = torch.isfinite(native).detach()
        (native[finite] * weights[finite]).sum().backward()
        (generic[finite] * weights[finite]).sum().backward()
        # Equal everywhere, including the NaN (0 * inf) both give a fully masked row.
        torch.testing.assert_close(native_in.grad, generic_in.grad, rtol=tol, atol=tol,
                                   equal_nan=True)
        kept = logsumexp(xp, native_in, axis=1, keepdims=True)
        assert tuple(kept.shape) == (3, 1, 11)
