import math

import numpy as np
import pytest

from shared import entropy_bonus, kl_loss, policy_loss, ppo_ptx_objective, value_loss

LN = math.log
# Four valid tokens (ratio, advantage) and one padding column with garbage.
#   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
#   r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)      r=1.5, A=-1: max(1.5, 1.2) = 1.5
OLD = [[0.0, 0.0, 0.0, 0.0, 0.0]]
NEW = [[LN(1.5), LN(0.5), LN(0.5), LN(1.5), 123.0]]
ADV = [[1.0, 1.0, -1.0, -1.0, 99.0]]
MASK = [[1.0, 1.0, 1.0, 1.0, 0.0]]


def _policy(run, **kwargs):
    return run.call(
        policy_loss,
        run.asarray(NEW),
        run.asarray(OLD),
        run.asarray(ADV),
        run.asarray(MASK),
        **{"clip_low": 0.2, "agg_mode": "token-mean", **kwargs},
    )


def test_policy_loss_golden(run):
    loss, stats = _policy(run, eager=True)
    assert loss == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.5)
    k3 = [r - 1 - LN(r) for r in (1.5, 0.5, 0.5, 1.5)]  # KL(old || new), Schulman's k3
    assert stats["approx_kl"] == pytest.approx(np.mean(k3))


def test_policy_loss_asymmetric_clip(run):
    # clip_high 0.3: r=1.5, A=+1 now gives max(-1.5, -1.3) = -1.3.
    loss, _ = _policy(run, clip_high=0.3)
    assert loss == pytest.approx((-1.3 - 0.5 + 0.8 + 1.5) / 4)


def test_policy_loss_dual_clip(run):
    # r=5, A=-1: max(5, 1.2) = 5, dual clip c=3 caps it at -c A = 3 (verl / Ye et al. 2020).
    new, old, adv, mask = [[LN(5.0)]], [[0.0]], [[-1.0]], [[1.0]]
    args = [run.asarray(a) for a in (new, old, adv, mask)]
    loss, stats = run.call(policy_loss, *args, clip_low=0.2, dual_clip=3.0)
    assert loss == pytest.approx(3.0)
    assert stats["dual_clip_fraction"] == pytest.approx(1.0)
    loss, _ = run.call(policy_loss, *args, clip_low=0.2)
    assert loss == pytest.approx(5.0)


def test_policy_loss_log_ratio_clamp(run):
    args = [run.asarray(a) for a in ([[30.0]], [[0.0]], [[-1.0]], [[1.0]])]
    loss, _ = run.call(policy_loss, *args, clip_low=0.2, log_ratio_clamp=20.0)
    assert loss == pytest.approx(math.exp(20.0))


def test_policy_loss_errors(run):
    x = run.asarray(OLD)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(x, x, x, x, clip_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, x, clip_low=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, run.asarray([[1.0]]), x, clip_low=0.2)


def test_value_loss_golden(run):
    # (v, v_old, R), clip 0.2:
    #   (1.0, 0.5, 0.0): v_clip 0.7, max(1.0, 0.49) = 1.0
    #   (0.9, 0.5, 1.0): v_clip 0.7, max(0.01, 0.09) = 0.09 (clipped side larger)
    values = run.asarray([[1.0, 0.9, 5.0]])
    old = run.asarray([[0.5, 0.5, -5.0]])
    returns = run.asarray([[0.0, 1.0, 7.0]])
    mask = run.asarray([[1.0, 1.0, 0.0]])
    loss, stats = run.call(value_loss, values, old, returns, mask, clip_range=0.2, eager=True)
    assert loss == pytest.approx(0.5 * (1.0 + 0.09) / 2)
    assert stats["value_clip_fraction"] == pytest.approx(0.5)
    loss, stats = run.call(value_loss, values, old, returns, mask, scale=1.0)
    assert loss == pytest.approx((1.0 + 0.01) / 2)
    assert stats["value_clip_fraction"] == 0.0


def test_entropy_bonus(run):
    logits = run.asarray(np.zeros((1, 2, 2)))  # uniform over 2 tokens: H = log 2
    mask = run.asarray([[1.0, 1.0]])
    assert run.call(entropy_bonus, logits, mask) == pytest.approx(LN(2.0))
    entropy = run.asarray([[1.0, 3.0]])
    assert run.call(entropy_bonus, entropy, mask) == pytest.approx(2.0)


def test_kl_loss(run):
    # k3 with p = log 1/2, q = log 1/4: 1/2 + ln 2 - 1.
    out = run.call(
        kl_loss, run.asarray([[LN(0.5), 0.0]]), run.asarray([[LN(0.25), 5.0]]),
        run.asarray([[1.0, 0.0]]),
    )
    assert out == pytest.approx(0.5 + LN(2.0) - 1.0)


def test_ppo_ptx_objective():
    assert ppo_ptx_objective(1.0, 2.0, unsup_coef=27.8) == pytest.approx(56.6)


def test_torch_gradcheck_policy_and_value_loss():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4)
    old = torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    new = (old + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp: policy_loss(lp, old, adv, mask, clip_low=0.2, dual_clip=3.0)[0], (new,)
    )
    returns = torch.randn(shape, generator=gen, dtype=torch.float64)
    values = (old + torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, old, returns, mask, clip_range=0.2)[0], (values,)
    )
    logits = torch.randn((3, 4, 5), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_bonus(z, mask), (logits,))


def test_jax_and_torch_gradients_agree(jax_x64):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(1)
    old, adv = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    new = old + 0.4 * rng.normal(size=(2, 5))
    mask = np.array([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def loss(lp, xp_old, xp_adv, xp_mask):
        return policy_loss(lp, xp_old, xp_adv, xp_mask, clip_low=0.2, clip_high=0.28)[0]

    jnp = jax.numpy
    jax_grad = jax.jit(jax.grad(loss))(*(jnp.asarray(a) for a in (new, old, adv, mask)))
    lp = torch.asarray(new, requires_grad=True)
    loss(lp, *(torch.asarray(a) for a in (old, adv, mask))).backward()
    np.testing.assert_allclose(np.asarray(jax_grad), lp.grad.numpy(), rtol=1e-12, atol=1e-15)
