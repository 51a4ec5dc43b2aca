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
