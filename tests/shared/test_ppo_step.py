"""The whole PPO pipeline per preset, and the `deepspeed_chat` preset against a
transcription of DeepSpeed-Chat's own code (tests/shared/dschat_reference.py)."""

import array_api_compat
import numpy as np
import pytest
from array_helpers import Runner
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import compute_advantages, get_preset, make_kl_controller, ppo_losses

torch = pytest.importorskip("torch")
dschat = pytest.importorskip("dschat_reference")

PAD = 0


def _dschat_batch(lengths, prompt_len=3, answer_len=6, vocab=50, seed=0):
    """Full-sequence DeepSpeed-Chat inputs: seq [B, L], per-position arrays [B, L - 1]."""
    rng = np.random.default_rng(seed)
    b, seq_len = len(lengths), prompt_len + answer_len
    prompts = rng.integers(1, vocab, size=(b, prompt_len))
    answers = rng.integers(1, vocab, size=(b, answer_len))
    answers[np.arange(answer_len)[None] >= np.asarray(lengths)[:, None]] = PAD
    seq = np.concatenate([prompts, answers], axis=1)
    shape = (b, seq_len - 1)
    log_probs = rng.normal(size=shape) - 2.0
    return {
        "prompts": prompts,
        "attention_mask": (seq != PAD).astype(np.int64),
        "log_probs": log_probs,
        "ref_log_probs": log_probs + 0.3 * rng.normal(size=shape),
        "reward_score": 4.0 * rng.normal(size=b),  # some beyond the +-5 clip
        "values": rng.normal(size=shape),
        "actor_log_prob": log_probs + 0.2 * rng.normal(size=shape),
        "new_values": rng.normal(size=shape),
    }


def _reference(batch):
    t = {k: torch.tensor(v) for k, v in batch.items()}
    for key in ("actor_log_prob", "new_values"):
        t[key].requires_grad_()
    rewards, adv, ret, actor, critic = dschat.train_rlhf_math(
        t["prompts"], t["log_probs"].clone(), t["ref_log_probs"], t["reward_score"],
        t["values"].clone(), t["attention_mask"], t["actor_log_prob"], t["new_values"],
    )
    (actor + critic).backward()
    start = batch["prompts"].shape[1] - 1
    return {
        "token_rewards": rewards[:, start:].numpy(),
        "advantages": adv.numpy(),
        "returns": ret.detach().numpy(),
        "actor_loss": actor.item(),
        "critic_loss": critic.item(),
        "actor_grad": t["actor_log_prob"].grad[:, start:].numpy(),
        "critic_grad": t["new_values"].grad[:, start:].numpy(),
    }


def _ours(run, batch, conventions):
    start = batch["prompts"].shape[1] - 1
    response = {  # slice DeepSpeed-Chat's full-sequence arrays to response-aligned [B, T]
        k: run.asarray(batch[k][:, start:])
        for k in ("log_probs", "ref_log_probs", "values", "actor_log_prob", "new_values")
    }
    mask = run.asarray(batch["attention_mask"][:, 1:][:, start:].astype(float))
    out = run.call(
        compute_advantages,
        run.asarray(batch["reward_score"]),
        response["log_probs"],
        response["ref_log_probs"],
        response["values"],
        mask,
        conventions=conventions,
    )
    actor, critic, _ = run.call(
        ppo_losses,
        response["actor_log_prob"],
        response["log_probs"],
        run.asarray(out["advantages"]),
        response["new_values"],
        response["values"],
        run.asarray(out["returns"]),
        mask,
        conventions=conventions,
    )
    return out, actor, critic


def _assert_matches_dschat(run, lengths, seed=0):
    batch = _dschat_batch(lengths, seed=seed)
    ref = _reference(batch)
    out, actor, critic = _ours(run, batch, get_preset("deepspeed_chat"))
    for key in ("token_rewards", "advantages", "returns"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(actor, ref["actor_loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(critic, ref["critic_loss"], rtol=1e-6, atol=1e-6)


def test_deepspeed_chat_preset_matches_reference(run):
    # Full-length (6), length-1, and in-between responses.
    _assert_matches_dschat(run, lengths=[6, 1, 3, 5, 2])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 1000))
def test_deepspeed_chat_preset_matches_reference_random(lengths, seed):
    _assert_matches_dschat(Runner(array_api_compat.numpy), lengths, seed)


def test_deepspeed_chat_gradients_match_reference():
    batch = _dschat_batch([6, 1, 4], seed=3)
    ref = _reference(batch)
    start = batch["prompts"].shape[1] - 1
    conv = get_preset("deepspeed_chat")
    resp = {k: torch.tensor(v[:, start:]) for k, v in batch.items() if v.ndim == 2}
    mask = torch.tensor(batch["attention_mask"][:, 1:][:, start:], dtype=torch.float64)
    out = compute_advantages(
        torch.tensor(batch["reward_score"]), resp["log_probs"], resp["ref_log_probs"],
        resp["values"], mask, conventions=conv,
    )
    new_lp = resp["actor_log_prob"].clone().requires_grad_()
    new_v = resp["new_values"].clone().requires_grad_()
    actor, critic, _ = ppo_losses(
        new_lp, resp["log_probs"], out["advantages"], new_v, resp["values"], out["returns"],
        mask, conventions=conv,
    )
    (actor + critic).backward()
    np.testing.assert_allclose(new_lp.grad.numpy(), ref["actor_grad"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(new_v.grad.numpy(), ref["critic_grad"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["default", "nemo", "openrlhf", "trl", "deepspeed_chat"])
def test_every_preset_runs(run, name):
    batch = _dschat_batch([6, 2, 4], seed=1)
    out, actor, critic = _ours(run, batch, get_preset(name))
    assert np.isfinite(actor) and np.isfinite(critic)
    assert all(np.isfinite(v).all() for v in out.values())


def test_kl_as_loss_and_entropy(run):
    conv = get_preset("default", kl_in="loss", kl_estimator="k3", entropy_coef=0.01)
    lp = run.asarray([[-1.0, -2.0, 0.0]])
    ref = run.asarray([[-1.5, -2.0, 9.0]])
    mask = run.asarray([[1.0, 1.0, 0.0]])
    out = run.call(
        compute_advantages, run.asarray([1.0]), lp, ref, run.asarray(np.zeros((1, 3))), mask,
        conventions=conv,
    )
    # kl_in="loss": no KL in the rewards; the score sits on the last valid token.
    np.testing.assert_allclose(out["token_rewards"], [[0.0, 1.0, 0.0]])
    zeros = run.asarray(np.zeros((1, 3)))
    entropy = run.asarray([[2.0, 4.0, 100.0]])
    actor, _, stats = run.call(
        ppo_losses, lp, lp, zeros, zeros, zeros, zeros, mask,
        conventions=conv, entropy=entropy, ref_logprobs=ref, kl_coef=0.5,
    )
    k3 = np.exp(-0.5) + 0.5 - 1.0  # token 0: p - q = 0.5; token 1: 0
    assert stats["kl_loss"] == pytest.approx(k3 / 2)
    assert stats["entropy"] == pytest.approx(3.0)
    assert actor == pytest.approx(0.0 - 0.01 * 3.0 + 0.5 * k3 / 2)


def test_make_kl_controller():
    fixed = make_kl_controller(get_preset("deepspeed_chat"))
    assert fixed.update(fixed.init(), current_kl=50.0, n_steps=8).kl_coef == 0.1
    adaptive = make_kl_controller(
        get_preset("default", kl_controller="adaptive", kl_target=6.0, kl_horizon=10000)
    )
    # Ziegler et al.: KL 12 -> error clipped to 0.2; 0.05 * (1 + 0.2 * 100 / 10000).
    state = adaptive.update(adaptive.init(), current_kl=12.0, n_steps=100)
    assert state.kl_coef == pytest.approx(0.05 * 1.002)


def test_missing_inputs_raise(run):
    x = run.asarray(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="entropy"):
        ppo_losses(x, x, x, x, x, x, x, conventions=get_preset("default", entropy_coef=0.1))
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_losses(x, x, x, x, x, x, x, conventions=get_preset("default", kl_in="loss"))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=2, max_size=4),
    st.integers(1, 3),
    st.floats(-20, 20),
    st.sampled_from(["default", "nemo", "openrlhf"]),
)
def test_padding_never_changes_the_pipeline(lengths, pad, garbage, name):
    """Extra masked columns with garbage change nothing (last_token presets)."""
    rng = np.random.default_rng(sum(lengths))
    b, t = len(lengths), 5
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(float)
    arrays = [rng.normal(size=(b, t)) for _ in range(5)]

    def pipeline(arrs, m):
        conv = get_preset(name)
        out = compute_advantages(np.linspace(-1, 1, b), arrs[0], arrs[1], arrs[2], m,
                                 conventions=conv)
        actor, critic, _ = ppo_losses(arrs[3], arrs[0], out["advantages"], arrs[4], arrs[2],
                                      out["returns"], m, conventions=conv)
        return out, actor, critic

    base = pipeline(arrays, mask)
    extra = np.full((b, pad), garbage)
    padded = pipeline(
        [np.concatenate([a, extra], 1) for a in arrays],
        np.concatenate([mask, np.zeros((b, pad))], 1),
    )
    for key in base[0]:
        np.testing.assert_allclose(padded[0][key][:, :t], base[0][key], atol=1e-10, err_msg=key)
    np.testing.assert_allclose(padded[1:], base[1:], atol=1e-10)


def test_whiten_rewards_uses_the_episode_mask():
    # TRL: masked_whiten(rewards, ~padding_mask_p1, shift_mean=False), i.e. over t <= n.
    from shared import episode_mask, masked_whiten

    batch = _dschat_batch([6, 2, 4], seed=2)
    start = batch["prompts"].shape[1] - 1
    args = [batch["reward_score"]] + [
        batch[k][:, start:] for k in ("log_probs", "ref_log_probs", "values")
    ]
    mask = batch["attention_mask"][:, start + 1 :].astype(float)
    plain = compute_advantages(*args, mask, conventions=get_preset("trl"))
    whitened = compute_advantages(
        *args, mask, conventions=get_preset("trl", whiten_rewards=True)
    )
    episode = episode_mask(mask, position="dschat")
    expected = masked_whiten(plain["token_rewards"], episode, shift_mean=False)
    np.testing.assert_allclose(whitened["token_rewards"], expected, rtol=1e-12)
