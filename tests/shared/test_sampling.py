"""shared.sampling: filters and inverse-CDF sampling, identical on numpy, torch and jax."""

from __future__ import annotations

import numpy as np
import pytest

from shared.sampling import filter_logits, sample_token

LOGITS = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))  # probabilities chosen by hand


def _backends():
    import jax
    import jax.numpy as jnp
    import torch

    return {
        "numpy": (np.asarray, lambda f: f),
        "torch": (torch.as_tensor, lambda f: f),
        "jax-jit": (jnp.asarray, jax.jit),
    }


@pytest.mark.parametrize("u, expected", [(0.05, 0), (0.11, 1), (0.49, 1), (0.5, 2), (0.7, 3),
                                         (0.999, 3)])
def test_inverse_cdf_golden(u, expected):
    # cdf = [0.1, 0.5, 0.7, 1.0]; the token is the first index whose cdf exceeds u.
    assert sample_token(LOGITS, np.array([u]))[0] == expected


def test_greedy_ignores_uniforms():
    assert sample_token(LOGITS, np.array([0.01]), do_sample=False)[0] == 1


def test_top_k_keeps_k_most_likely():
    out = filter_logits(LOGITS, top_k=2)
    assert np.isfinite(out).tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_mass():
    # sorted probs 0.4, 0.3, 0.2, 0.1: mass before each is 0, 0.4, 0.7, 0.9.
    assert np.isfinite(filter_logits(LOGITS, top_p=0.5)).tolist() == [[False, True, False, True]]
    assert np.isfinite(filter_logits(LOGITS, top_p=0.4)).tolist() == [[False, True, False, False]]
    assert np.isfinite(filter_logits(LOGITS, top_p=0.75)).sum() == 3


def test_temperature_sharpens():
    cold = filter_logits(LOGITS, temperature=0.5)
    np.testing.assert_allclose(cold, LOGITS / 0.5)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
    dict(temperature=1.3, top_k=7, top_p=0.9), dict(do_sample=False),
], ids=["plain", "temperature", "top_k", "top_p", "all", "greedy"])
def test_same_tokens_on_every_backend(kwargs, jax_x64):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 23)) * 2
    uniforms = rng.random(16)
    expected = sample_token(logits, uniforms, **kwargs)
    for name, (to_array, wrap) in _backends().items():
        fn = wrap(lambda lg, u: sample_token(lg, u, **kwargs))
        got = np.asarray(fn(to_array(logits), to_array(uniforms)))
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_empirical_distribution_matches_probabilities():
    rng = np.random.default_rng(1)
    uniforms = rng.random(20000)
    tokens = sample_token(np.repeat(LOGITS, len(uniforms), axis=0), uniforms)
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq, [0.1, 0.4, 0.2, 0.3], atol=0.015)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0)])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError):
        filter_logits(LOGITS, **bad)
