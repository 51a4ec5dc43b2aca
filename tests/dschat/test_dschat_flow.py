"""The DeepSpeed-Chat step-3 transcription (dschat_flow.py): its rollout-shape rules, and its
numbers on tiny OPT models equal to the shared math under the `deepspeed_chat` preset, with
pad == EOS (DS-Chat's OPT tokenizer: pad = BOS = EOS = `</s>`) and pad != EOS (OPT's own
`<pad>`)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dschat_flow import (  # noqa: E402
    Hyper,
    RewardModel,
    end_scores,
    generated_width,
    kept_rows,
    response,
    separate,
    step3,
    trim_answers,
)

from shared import compute_advantages, get_preset, ppo_losses  # noqa: E402

torch.set_num_threads(1)
VOCAB = 48
OPT_PAD, OPT_EOS = 1, 2  # facebook/opt-*: <pad> = 1, </s> = 2 (also its BOS)


# --------------------------------------------------------------------------- shape rules


def test_generated_width_pad_is_not_eos():
    p, e = 0, 9
    answers = torch.tensor([[5, 6, e, p, p, p],
                            [7, e, p, p, p, p]])
    assert generated_width(answers, e) == 3  # the longest answer with its EOS
    assert trim_answers(answers, e).tolist() == [[5, 6, e], [7, e, p]]


def test_generated_width_pad_is_eos_keeps_the_last_eos_column():
    e = 9  # pad == eos: the column that finished the last row is all EOS/pad, and is kept
    answers = torch.tensor([[5, 6, e, e, e, e],
                            [7, e, e, e, e, e]])
    assert generated_width(answers, e) == 3
    assert trim_answers(answers, e).tolist() == [[5, 6, e], [7, e, e]]


def test_generated_width_unfinished_row_keeps_every_column():
    e = 9
    answers = torch.tensor([[5, 6, 7, 8], [7, e, 0, 0]])
    assert generated_width(answers, e) == 4


def test_kept_rows_counts_non_pad_tokens():
    e = 9
    # pad == EOS: "x EOS" is one real token and is dropped; pad != EOS it counts two.
    assert kept_rows(torch.tensor([[5, e, e], [5, 6, e]]), pad_id=e).tolist() == [False, True]
    assert kept_rows(torch.tensor([[5, e, 0], [e, 0, 0]]), pad_id=0).tolist() == [True, False]


def test_end_scores_read_before_the_first_answer_pad():
    values = torch.arange(12.0).reshape(2, 6)
    # prompt width 2; pad == eos == 9: the score is read before the EOS
    ids = torch.tensor([[9, 3, 5, 6, 9, 9], [9, 3, 5, 6, 7, 8]])
    assert end_scores(values, ids, pad_id=9, prompt_length=2).tolist() == [3.0, 11.0]
    # pad 0 != eos 9: the score is read at the EOS; the prompt's pad is ignored
    ids = torch.tensor([[0, 3, 5, 9, 0, 0], [0, 3, 9, 0, 0, 0]])
    assert end_scores(values, ids, pad_id=0, prompt_length=2).tolist() == [3.0, 8.0]


def test_separate_keeps_order_and_a_short_last_micro_batch():
    exp = {"a": torch.arange(5), "b": torch.arange(5) * 10}
    parts = separate([exp, {"a": torch.arange(2) + 5, "b": torch.arange(2)}], 2)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4], [5, 6]]


# --------------------------------------------------------------------------- tiny models


def _opt_config(pad_id):
    return transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=8,
        do_layer_norm_before=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        layerdrop=0.0, pad_token_id=pad_id, bos_token_id=OPT_EOS, eos_token_id=OPT_EOS)


def _models(seed=0):
    # OPT's own config (pad_token_id 1) as DS-Chat builds it: its `model.config.pad_token_id
    # = eos` comes after construction, so the embeddings' padding_idx stays 1.
    config = _opt_config(OPT_PAD)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "sdpa"}  # eager NaNs on fully masked rows in fp64
    actor = transformers.OPTForCausalLM._from_config(config, **kwargs).double()
    ref = transformers.OPTForCausalLM._from_config(config, **kwargs).double()
    critic = RewardModel(transformers.OPTModel._from_config(config, **kwargs), OPT_PAD).double()
    reward = RewardModel(transformers.OPTModel._from_config(config, **kwargs), OPT_PAD).double()
    for m in (actor, ref, critic, reward):
        m.eval()  # no dropout anyway; DS-Chat's train() mode differs only in dropout
    ref.requires_grad_(False)
    reward.requires_grad_(False)
    return actor, ref, critic, reward


def _rollout(pad_id, lengths, *, prompt_width=4, answer_width=7, seed=0):
    """Left-padded prompts that start with OPT's BOS `</s>`, and answers of `lengths` real
    tokens, then EOS (None: no EOS, the row fills every column), then pad."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    prompts = torch.full((b, prompt_width), pad_id)
    for i in range(b):
        n = 2 + i % (prompt_width - 1)
        prompts[i, prompt_width - n] = OPT_EOS  # BOS
        prompts[i, prompt_width - n + 1:] = torch.randint(3, VOCAB, (n - 1,), generator=g)
    answers = torch.randint(3, VOCAB, (b, answer_width), generator=g)
    for i, n in enumerate(lengths):
        if n is not None:
            answers[i, n] = OPT_EOS
            answers[i, n + 1:] = pad_id
    return prompts, answers


def _shared_path(models, prompts, answers, *, pad_id, micro_batch_size, gas):
    """The same rollout through the shared math (deepspeed_chat preset) with autograd:
    mask_pad_tokens (response mask = answers != pad, attention = seq != pad), unmasked
    log-probs and values, one token-mean per micro-batch divided by gas."""
    from torch_rlhf.models import gather_end_values

    actor, ref, critic, reward = models
    conv = get_preset("deepspeed_chat")
    assert conv.mask_pad_tokens and conv.accumulation_scaling == "micro_batch_mean"
    p = prompts.shape[1]
    seq = torch.cat([prompts, answers], 1)
    attn = (seq != pad_id).long()
    mask = (answers != pad_id).double()

    def token_lp(model):
        logits = model(seq, attention_mask=attn).logits[:, p - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, answers[..., None])[..., 0]

    with torch.no_grad():
        old_lp, ref_lp = token_lp(actor), token_lp(ref)
        values = critic(seq, attn)[:, p - 1:-1]
        scores = gather_end_values(reward(seq, attn), attn, prompt_length=p)
        out = compute_advantages(scores, old_lp, ref_lp, values, mask, conventions=conv)
    for i in range(0, len(seq), micro_batch_size):
        rows = slice(i, i + micro_batch_size)
        logits = actor(seq[rows], attention_mask=attn[rows]).logits[:, p - 1:-1]
        new_lp = torch.log_softmax(logits, -1).gather(-1, answers[rows, :, None])[..., 0]
        new_v = critic(seq[rows], attn[rows])[:, p - 1:-1]
        a_loss, c_loss, _ = ppo_losses(new_lp, old_lp[rows], out["advantages"][rows], new_v,
                                       values[rows], out["returns"][rows], mask[rows],
                                       conventions=conv)
        ((a_loss + c_loss) / gas).backward()
    return out


CASES = {
    # the longest row finishes (its score slot falls back on its EOS), a one-token answer
    "pad_ne_eos": (OPT_PAD, [3, 1, 5, 0, 2]),
    # DS-Chat's OPT tokenizer: pad = EOS (= BOS); "x EOS" (row 1) is dropped
    "pad_eq_eos": (OPT_EOS, [3, 1, 5, 4, 2]),
    # a row without EOS: no trimming, its score on the last slot
    "unfinished": (OPT_PAD, [3, None, 2]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("micro_batch_size,gas", [(2, 2), (4, 1)])
def test_flow_equals_shared_math(case, micro_batch_size, gas):
    pad_id, lengths = CASES[case]
    models = _models()
    actor, ref, critic, reward = models
    prompts, answers = _rollout(pad_id, lengths)
    n_rows = int(kept_rows(trim_answers(answers, OPT_EOS), pad_id).sum())
    n_micro = -(-n_rows // micro_batch_size)
    micro_step = -n_micro % gas  # end exactly on a DeepSpeed boundary
    hyper = Hyper(gradient_accumulation_steps=gas)
    result = step3(actor, ref, critic, reward, prompts, answers, pad_id=pad_id,
                   eos_id=OPT_EOS, micro_batch_size=micro_batch_size, hyper=hyper,
                   micro_step=micro_step)
    keep = result.kept[0]
    trimmed = trim_answers(answers, OPT_EOS)
    if case == "pad_eq_eos":
        assert keep.tolist() == [True, False, True, True, True]
    if case == "unfinished":
        assert trimmed.shape[1] == answers.shape[1]
    else:
        assert trimmed.shape[1] == max(lengths) + 1 < answers.shape[1]
    flow_grads = (result.actor_grads, result.critic_grads)
    assert len(result.step_grads) == 1

    actor.zero_grad()
    critic.zero_grad()
    out = _shared_path(models, prompts[keep], trimmed[keep], pad_id=pad_id,
                       micro_batch_size=micro_batch_size, gas=gas)
    p = prompts.shape[1]
    mbs = result.micro_batches
    rewards = torch.cat([response(m["rewards"], p) for m in mbs])
    advantages = torch.cat([m["advantages"] for m in mbs])
    returns = torch.cat([m["returns"] for m in mbs])
    torch.testing.assert_close(out["token_rewards"], rewards, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["advantages"], advantages, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["returns"], returns, rtol=1e-10, atol=1e-12)
    for model, grads in zip((actor, critic), flow_grads, strict=True):
        for name, param in model.named_parameters():
            if param.requires_grad:
                got = torch.zeros_like(param) if param.grad is None else param.grad
                torch.testing.assert_close(got, grads[name], rtol=1e-8, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in flow_grads[0].values())


def test_score_slot_pad_eq_eos_is_the_eos_and_pad_ne_eos_one_past():
    models = _models()
    kl_free = Hyper(kl_ctl=0.0)
    for pad_id, slot in ((OPT_EOS, 3), (OPT_PAD, 4)):  # 3 real tokens, EOS at index 3
        prompts, answers = _rollout(pad_id, [3, 5])
        result = step3(*models, prompts, answers, pad_id=pad_id, eos_id=OPT_EOS,
                       micro_batch_size=2, hyper=kl_free)
        rewards = response(result.micro_batches[0]["rewards"], prompts.shape[1])
        score = result.experiences[0]["rewards"][0].clamp(-5, 5)
        assert torch.nonzero(rewards[0]).flatten().tolist() == [slot]
        torch.testing.assert_close(rewards[0, slot], score)
        # the longest row: its one-past-the-end slot does not exist, the score is on its EOS
        width = rewards.shape[1]
        assert torch.nonzero(rewards[1]).flatten().tolist() == [width - 1]


def test_a_boundary_before_the_last_micro_batch_needs_optimizer_step():
    models = _models()
    prompts, answers = _rollout(OPT_PAD, [3, 1, 2, 4])
    with pytest.raises(ValueError, match="optimizer_step"):
        step3(*models, prompts, answers, pad_id=OPT_PAD, eos_id=OPT_EOS, micro_batch_size=1,
              hyper=Hyper(gradient_accumulation_steps=2))
    calls = []
    result = step3(*models, prompts, answers, pad_id=OPT_PAD, eos_id=OPT_EOS,
                   micro_batch_size=1, hyper=Hyper(gradient_accumulation_steps=2),
                   optimizer_step=lambda: calls.append(1))
    assert len(calls) == len(result.step_grads) == 2
