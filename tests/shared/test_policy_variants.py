import math

import numpy as np
import pytest

from shared import DAPO_CLIP_HIGHER, GSPO_CLIP, gspo_policy_loss, policy_loss
from shared.aggregation import AGG_MODES
from shared.policy_variants import DAPO_LOSS_AGG, DR_GRPO_LOSS_AGG

# Row 0: log-ratios (0.2, -0.1) -> s = e^0.05, A = +1; row 1: one token, log-ratio -0.3,
# s = e^-0.3, A = -1; padding holds garbage.
OLD = [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
NEW = [[-0.8, -2.1, 9.0], [-0.8, 9.0, 9.0]]
ADV = [[1.0, 1.0, 5.0], [-1.0, 5.0, 5.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_gspo_golden(run):
    loss, stats = run.call(gspo_policy_loss, run.asarray(NEW), run.asarray(OLD),
                           run.asarray(ADV), run.asarray(MASK), clip_low=0.03)
    # Row 0: max(-e^0.05, -1.03) = -1.03 (clipped); row 1: max(e^-0.3, 0.97) = 0.97 (clipped).
    # seq-mean-token-mean: (-1.03 + 0.97) / 2.
    np.testing.assert_allclose(loss, (-1.03 + 0.97) / 2, rtol=1e-12)
    np.testing.assert_allclose(stats["clip_fraction"], 1.0)
    np.testing.assert_allclose(stats["seq_ratio_mean"], (math.exp(0.05) + math.exp(-0.3)) / 2)
    np.testing.assert_allclose(stats["seq_ratio_max"], math.exp(0.05))


def test_gspo_equals_ppo_on_one_token_answers(run):
    rng = np.random.default_rng(0)
    old = rng.normal(size=(4, 1))
    new, adv = old + 0.3 * rng.normal(size=(4, 1)), rng.normal(size=(4, 1))
    mask = np.ones((4, 1))
    args = [run.asarray(x) for x in (new, old, adv, mask)]
    gspo, _ = run.call(gspo_policy_loss, *args, clip_low=0.2, clip_high=0.28)
    ppo, _ = run.call(policy_loss, *args, clip_low=0.2, clip_high=0.28,
                      agg_mode="seq-mean-token-mean")
    np.testing.assert_allclose(gspo, ppo, rtol=1e-12)


def test_gspo_gradient_matches_verl_token_form():
    """With one advantage per row, our sequence form has verl's GSPO-token gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    old = torch.asarray(-np.abs(rng.normal(size=(3, 4))))
    mask = torch.asarray((np.arange(4)[None, :] < np.array([4, 2, 3])[:, None]).astype(float))
    adv = torch.asarray(rng.normal(size=(3, 1))).expand(3, 4)
    init = old + 0.02 * torch.asarray(rng.normal(size=(3, 4)))

    ours = init.clone().requires_grad_(True)
    gspo_policy_loss(ours, old, adv, mask, clip_low=0.03, clip_high=0.04)[0].backward()

    # verl compute_policy_loss_gspo, transcribed.
    lp = init.clone().requires_grad_(True)
    neg_kl = lp - old
    seq = (neg_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    losses = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - 0.03, 1 + 0.04))
    per_row = (losses * mask).sum(-1) / mask.sum(-1)
    per_row.mean().backward()
    np.testing.assert_allclose(ours.grad.numpy(), lp.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_named_settings():
    assert dict(DAPO_CLIP_HIGHER) == {"clip_low": 0.2, "clip_high": 0.28}
    assert dict(GSPO_CLIP) == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert DAPO_LOSS_AGG in AGG_MODES and DR_GRPO_LOSS_AGG in AGG_MODES
    with pytest.raises(TypeError):
        DAPO_CLIP_HIGHER["clip_high"] = 0.3


def test_gspo_errors(run):
    x = run.asarray([[0.0]])
    with pytest.raises(ValueError, match="clip_low"):
        gspo_policy_loss(x, x, x, x, clip_low=1.5)
    with pytest.raises(ValueError, match="advantages"):
        gspo_policy_loss(x, x, run.asarray([[0.0, 1.0]]), x, clip_low=0.2)
