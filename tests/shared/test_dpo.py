import math

import numpy as np
import pytest

from shared import dpo_loss, sequence_logprobs

# Pair 0: h = (-1 - -3) - (-2 - -2) = 2; pair 1: h = (-4 - -3) - (-1 - -2) = -2.
CHOSEN, REJECTED = [-1.0, -4.0], [-3.0, -1.0]
REF_CHOSEN, REF_REJECTED = [-2.0, -3.0], [-2.0, -2.0]


def _args(run):
    return [run.asarray(x) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def _softplus(x):
    return math.log1p(math.exp(x))


def test_sigmoid_golden(run):
    loss, stats = run.call(dpo_loss, *_args(run), beta=0.5)
    # -log sigma(0.5 h) = softplus(-0.5 h): softplus(-1) and softplus(1).
    np.testing.assert_allclose(loss, (_softplus(-1.0) + _softplus(1.0)) / 2, rtol=1e-12)
    # rewards: chosen 0.5 * (1, -1), rejected 0.5 * (-1, 1).
    np.testing.assert_allclose(stats["rewards/chosen"], 0.0, atol=1e-15)
    np.testing.assert_allclose(stats["rewards/rejected"], 0.0, atol=1e-15)
    np.testing.assert_allclose(stats["rewards/margins"], 0.0, atol=1e-15)
    np.testing.assert_allclose(stats["rewards/accuracies"], 0.5)


def test_label_smoothing_and_ipo_golden(run):
    loss, _ = run.call(dpo_loss, *_args(run), beta=0.5, label_smoothing=0.1)
    per = [0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0),
           0.9 * _softplus(1.0) + 0.1 * _softplus(-1.0)]
    np.testing.assert_allclose(loss, np.mean(per), rtol=1e-12)
    loss, _ = run.call(dpo_loss, *_args(run), beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(loss, ((2 - 1) ** 2 + (-2 - 1) ** 2) / 2, rtol=1e-12)  # 1/(2b)=1


def test_normalizer_makes_splits_add_up(run):
    full, _ = dpo_loss(*[np.asarray(x) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)],
                       beta=0.3)
    parts = sum(
        dpo_loss(*[np.asarray(x)[i : i + 1] for x in (CHOSEN, REJECTED, REF_CHOSEN,
                                                       REF_REJECTED)], beta=0.3,
                 normalizer=2.0)[0]
        for i in range(2)
    )
    np.testing.assert_allclose(parts, full, rtol=1e-12)


@pytest.mark.parametrize("h", [-3.0, 0.0, 2.5])
def test_gradient_tends_to_minus_beta_over_two(h):
    """dl/dh = -beta sigma(-beta h) -> -beta / 2 as beta -> 0 (any fixed h)."""
    torch = pytest.importorskip("torch")
    for beta in (1e-2, 1e-4, 1e-6):
        chosen = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        dpo_loss(chosen, zero, zero, zero, beta=beta)[0].backward()
        exact = -beta / (1.0 + math.exp(beta * h))
        np.testing.assert_allclose(chosen.grad.item(), exact, rtol=1e-12)
        np.testing.assert_allclose(chosen.grad.item() / beta, -0.5, atol=abs(h) * beta)


def test_gradient_jax_matches_torch(jax_x64):
    import jax
    import jax.numpy as jnp

    grad = jax.jit(jax.grad(lambda c: dpo_loss(c, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1),
                                       beta=1e-6)[0]))(jnp.asarray([2.0]))
    np.testing.assert_allclose(np.asarray(grad) / 1e-6, -0.5, atol=1e-6)


def test_sequence_logprobs(run):
    lp, mask = run.asarray([[-1.0, -2.0, 7.0], [-3.0, 7.0, 7.0]]), run.asarray(
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(run.call(sequence_logprobs, lp, mask), [-3.0, -3.0])
    np.testing.assert_allclose(run.call(sequence_logprobs, lp, mask, average=True), [-1.5, -3.0])


def test_dpo_errors(run):
    a = _args(run)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*a, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*a, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*a, label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_loss(*a[:3], run.asarray([0.0]))
