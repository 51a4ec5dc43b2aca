import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import bradley_terry_loss, dschat_pairwise_loss, kway_ranking_loss


def softplus(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_golden(run):
    chosen, rejected = run.asarray([2.0, 0.0]), run.asarray([0.0, 1.0])
    loss, stats = run.call(bradley_terry_loss, chosen, rejected)
    # -log sigma(d) = softplus(-d) for d = 2 and d = -1.
    assert loss == pytest.approx((softplus(-2.0) + softplus(1.0)) / 2)
    assert stats["accuracy"] == pytest.approx(0.5)
    assert stats["margin_mean"] == pytest.approx(0.5)
    loss, _ = run.call(bradley_terry_loss, chosen, rejected, margin=1.0)
    assert loss == pytest.approx((softplus(-1.0) + softplus(2.0)) / 2)


def test_bradley_terry_is_stable(run):
    loss, _ = run.call(bradley_terry_loss, run.asarray([1000.0]), run.asarray([-1000.0]))
    assert loss == pytest.approx(0.0, abs=1e-300)
    loss, _ = run.call(bradley_terry_loss, run.asarray([-1000.0]), run.asarray([1000.0]))
    assert loss == pytest.approx(2000.0)


def test_dschat_pairwise_golden(run):
    # Pair 0: chosen ends at its first pad (3), rejected at 4, first difference at 2:
    # span [2, 4): -log sigma(1 - 1) = ln 2 and -log sigma(2 - 0) = softplus(-2).
    # Pair 1: identical rows: span [L - 1, L) = [4, 5), -log sigma(0.5 - 0) = softplus(-0.5).
    chosen_ids = run.asarray([[7, 8, 9, 0, 0], [7, 8, 0, 0, 0]])
    rejected_ids = run.asarray([[7, 8, 4, 4, 0], [7, 8, 0, 0, 0]])
    chosen_values = run.asarray([[9.0, 9.0, 1.0, 2.0, 9.0], [0.0, 3.0, 0.0, 0.0, 0.5]])
    rejected_values = run.asarray([[-9.0, -9.0, 1.0, 0.0, -9.0], [0.0, 4.0, 0.0, 0.0, 0.0]])
    loss, stats = run.call(
        dschat_pairwise_loss, chosen_values, rejected_values, chosen_ids, rejected_ids,
        pad_token_id=0,
    )
    pair0 = (math.log(2.0) + softplus(-2.0)) / 2
    assert loss == pytest.approx((pair0 + softplus(-0.5)) / 2)
    # End scores: values at end - 1 (chosen index 2, rejected index 3; pair 1: index 1).
    np.testing.assert_allclose(stats["chosen_end_scores"], [1.0, 3.0])
    np.testing.assert_allclose(stats["rejected_end_scores"], [0.0, 4.0])


def _pairs(rng, b, seq_len, npab, vocab=20):
    ids = np.zeros((2 * b, seq_len), dtype=np.int64)
    for i in range(b):
        prompt = rng.integers(2, vocab, size=rng.integers(1, 3))
        for row, offset in ((i, 0), (i + b, b)):
            del offset
            answer = rng.integers(2, vocab, size=rng.integers(0, seq_len - npab - len(prompt)))
            tokens = np.concatenate([np.zeros(npab, np.int64), prompt, answer])
            ids[row, : len(tokens)] = tokens
        if rng.random() < 0.2:  # an identical pair
            ids[i + b] = ids[i]
    return ids, rng.normal(size=(2 * b, seq_len))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([0, 1]))
def test_dschat_pairwise_matches_reference(seed, b, npab):
    torch = pytest.importorskip("torch")
    from dschat_reference import reward_model_loss

    rng = np.random.default_rng(seed)
    ids, values = _pairs(rng, b, seq_len=8, npab=npab)
    # DeepSpeed-Chat asserts the divergence index > 0: the shared prompt guarantees it.
    ref_loss, ref_c, ref_r = reward_model_loss(
        torch.tensor(ids), torch.tensor(values), pad_id=0, num_padding_at_beginning=npab
    )
    loss, stats = dschat_pairwise_loss(
        values[:b], values[b:], ids[:b], ids[b:], pad_token_id=0, num_padding_at_beginning=npab
    )
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-12)
    np.testing.assert_allclose(stats["chosen_end_scores"], ref_c.numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["rejected_end_scores"], ref_r.numpy(), rtol=1e-12)


def test_dschat_pairwise_jit_and_grad(run):
    rng = np.random.default_rng(4)
    ids, values = _pairs(rng, 3, seq_len=8, npab=0)
    loss, _ = run.call(
        dschat_pairwise_loss,
        run.asarray(values[:3]), run.asarray(values[3:]),
        run.asarray(ids[:3]), run.asarray(ids[3:]),
        pad_token_id=0,
    )
    ref, _ = dschat_pairwise_loss(values[:3], values[3:], ids[:3], ids[3:], pad_token_id=0)
    np.testing.assert_allclose(loss, ref, rtol=1e-12)


def test_torch_gradcheck_reward_losses():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    ids, values = _pairs(rng, 3, seq_len=8, npab=0)
    chosen = torch.tensor(values[:3], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c: dschat_pairwise_loss(
            c, torch.tensor(values[3:]), torch.tensor(ids[:3]), torch.tensor(ids[3:]),
            pad_token_id=0,
        )[0],
        (chosen,),
    )
    scores = torch.tensor(rng.normal(size=(2, 4)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: kway_ranking_loss(s)[0], (scores,))


def test_kway_golden(run):
    # Best-first (3, 2, 1): pairs d = 1, 2, 1 -> (2 softplus(-1) + softplus(-2)) / 3.
    loss, stats = run.call(kway_ranking_loss, run.asarray([[3.0, 2.0, 1.0]]), eager=True)
    assert loss == pytest.approx((2 * softplus(-1.0) + softplus(-2.0)) / 3)
    assert stats["accuracy"] == 1.0
    assert stats["num_pairs"] == 3.0


def test_kway_num_valid(run):
    scores = run.asarray([[3.0, 2.0, 99.0], [1.0, 5.0, 7.0]])
    # Row 0 keeps the pair (0, 1) only; row 1 has n = 1, no pair, and is left out.
    loss, stats = run.call(kway_ranking_loss, scores, num_valid=run.asarray([2, 1]))
    assert loss == pytest.approx(softplus(-1.0))
    assert stats["num_pairs"] == 1.0


def test_kway_with_two_is_bradley_terry(run):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(5, 2))
    kway, _ = run.call(kway_ranking_loss, run.asarray(scores))
    bt, _ = run.call(bradley_terry_loss, run.asarray(scores[:, 0]), run.asarray(scores[:, 1]))
    np.testing.assert_allclose(kway, bt, rtol=1e-12)
