"""The `deepspeed_chat` preset's advantages and losses from what the loop passes (unmasked
log-probs, ref log-probs and values; the response mask of `mask_pad_tokens`; the answer width
of `trim_answer_width`) against the transcription of DeepSpeed-Chat's code, with pad == EOS
and pad != EOS. numpy on our side, no models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from shared import compute_advantages, get_preset, ppo_losses

torch = pytest.importorskip("torch")
dschat = pytest.importorskip("dschat_reference")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dschat"))
from dschat_flow import generated_width, kept_rows  # noqa: E402

CONV = get_preset("deepspeed_chat")
BOS_EOS, OWN_PAD = 2, 1  # OPT: </s> is BOS and EOS; <pad> is its own pad


def test_reproducer_a_unmasked_inputs():
    """Prompt width 2, response mask [1, 1, 0]: the third slot is the one-past-the-end slot
    that gets the score, and DeepSpeed-Chat keeps its KL term (log-prob -2 vs ref -1), so its
    reward is 1 + 0.1 = 1.1 only when the log-probs there are not masked."""
    scores = np.array([1.0])
    lp = np.array([[-1.0, -1.0, -2.0]])
    ref = np.array([[-1.0, -1.0, -1.0]])
    values = np.array([[0.5, 0.5, 0.8]])
    mask = np.array([[1.0, 1.0, 0.0]])
    out = compute_advantages(scores, lp, ref, values, mask, conventions=CONV)
    np.testing.assert_allclose(out["advantages"], [[0.55575, 0.585, 0.3]], rtol=1e-12)
    np.testing.assert_allclose(out["token_rewards"], [[0.0, 0.0, 1.1]], rtol=1e-12)

    # The transcription: full-sequence arrays [B, L - 1], the response from start = 1.
    t = lambda x: torch.tensor(np.concatenate([[[0.0]], x], 1))  # noqa: E731
    prompts = torch.tensor([[5, 6]])
    action_mask = torch.tensor([[1, 1, 1, 0]])
    rewards = dschat.compute_rewards(prompts, t(lp), t(ref), torch.tensor(scores), action_mask)
    adv, ret = dschat.get_advantages_and_returns(t(values), rewards, 1)
    np.testing.assert_allclose(rewards[:, 1:].numpy(), out["token_rewards"], rtol=1e-12)
    np.testing.assert_allclose(adv.numpy(), out["advantages"], rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), out["returns"], rtol=1e-12)

    # Masked inputs (zeros after the response) lose that KL term: not DeepSpeed-Chat.
    masked = compute_advantages(scores, lp * mask, ref * mask, values * mask, mask,
                                conventions=CONV)
    assert not np.allclose(masked["advantages"], out["advantages"])


def _rollout(rng, lengths, pad, *, prompt_width=4, answer_width=7, vocab=40):
    """Left-padded prompts starting with BOS </s>, answers of `lengths` real tokens then EOS
    (None: no EOS) then pad, and random unmasked per-position arrays."""
    b = len(lengths)
    prompts = np.full((b, prompt_width), pad)
    for i in range(b):
        n = int(rng.integers(2, prompt_width + 1))
        prompts[i, prompt_width - n] = BOS_EOS
        prompts[i, prompt_width - n + 1:] = rng.integers(3, vocab, n - 1)
    answers = rng.integers(3, vocab, (b, answer_width))
    for i, n in enumerate(lengths):
        if n is not None:
            answers[i, n] = BOS_EOS
            answers[i, n + 1:] = pad
    return prompts, answers


def _compare(prompts, answers, pad, rng):
    # DeepSpeed-Chat's rollout: generate's width, then the short rows dropped.
    answers = answers[:, :generated_width(torch.tensor(answers), BOS_EOS)]
    keep = kept_rows(torch.tensor(answers), pad).numpy()
    prompts, answers = prompts[keep], answers[keep]
    seq = np.concatenate([prompts, answers], 1)
    b, length = seq.shape
    start = prompts.shape[1] - 1
    shape = (b, length - 1)
    arrays = {
        "log_probs": rng.normal(size=shape) - 2.0,
        "values": rng.normal(size=shape),
        "new_values": rng.normal(size=shape),
    }
    arrays["ref_log_probs"] = arrays["log_probs"] + 0.3 * rng.normal(size=shape)
    arrays["actor_log_prob"] = arrays["log_probs"] + 0.2 * rng.normal(size=shape)
    scores = 4.0 * rng.normal(size=b)

    t = {k: torch.tensor(v) for k, v in arrays.items()}
    ref = dschat.train_rlhf_math(
        torch.tensor(prompts), t["log_probs"], t["ref_log_probs"], torch.tensor(scores),
        t["values"].clone(), torch.tensor((seq != pad).astype(np.int64)),  # seq != pad
        t["actor_log_prob"], t["new_values"])
    rewards, adv, ret, actor, critic = (x.detach().numpy() for x in ref)

    # Ours: the response-aligned slices, unmasked; the mask of mask_pad_tokens.
    resp = {k: v[:, start:] for k, v in arrays.items()}
    mask = (answers != pad).astype(np.float64)
    out = compute_advantages(scores, resp["log_probs"], resp["ref_log_probs"], resp["values"],
                             mask, conventions=CONV)
    a_loss, c_loss, _ = ppo_losses(resp["actor_log_prob"], resp["log_probs"],
                                   out["advantages"], resp["new_values"], resp["values"],
                                   out["returns"], mask, conventions=CONV)
    np.testing.assert_allclose(out["token_rewards"], rewards[:, start:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["advantages"], adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["returns"], ret, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a_loss, actor, rtol=1e-12)
    np.testing.assert_allclose(c_loss, critic, rtol=1e-12)
    return answers, out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pad", [BOS_EOS, OWN_PAD], ids=["pad_eq_eos", "pad_ne_eos"])
def test_transcription_equals_shared_math(pad, seed):
    rng = np.random.default_rng(seed)
    lengths = [int(n) if n < 6 else None for n in rng.integers(1, 7, size=5)]
    prompts, answers = _rollout(rng, lengths, pad)
    _compare(prompts, answers, pad, rng)


def test_score_slots_pad_eq_eos_and_pad_ne_eos():
    """3 real tokens then EOS, and a longest row of 5 (width 6 once trimmed): with pad == EOS
    the score sits on the EOS (index 3), else one past it (index 4); the longest row's
    one-past-the-end slot does not exist, its score falls back on its EOS (index 5)."""
    for pad, slot in ((BOS_EOS, 3), (OWN_PAD, 4)):
        rng = np.random.default_rng(0)
        prompts, answers = _rollout(rng, [3, 5], pad)
        answers, out = _compare(prompts, answers, pad, rng)
        assert answers.shape[1] == 6
        kl_free = compute_advantages(np.array([1.0, 2.0]), *(np.zeros(answers.shape),) * 3,
                                     (answers != pad).astype(float), conventions=CONV)
        assert np.flatnonzero(kl_free["token_rewards"][0]).tolist() == [slot]
        assert np.flatnonzero(kl_free["token_rewards"][1]).tolist() == [5]
