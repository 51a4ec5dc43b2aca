"""Level 3: losses, their statistics and every parameter gradient agree between the backends on
the same batch (SFT, the three reward-model losses, PPO actor and critic, entropy, ptx).

Gradients are compared tensor by tensor under HF state-dict names (torch `named_parameters`
against JAX gradients mapped by the converter's `to_state_dict`). The default suite runs SFT,
Bradley-Terry and PPO on every family but the tied Llama (test_parity_run covers the demo's
tied GQA Llama end to end) and the rarer objectives on one Llama; `-m slow` runs the whole
matrix, plus PPO under every preset.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests import batches as B
from parity_tests import objectives as obj
from parity_tests.harness import FAMILIES, assert_passed
from parity_tests.levels import (
    all_terms_conventions,
    objective_rows,
    ppo_rows,
    reward_rows,
    rollout_for,
    sft_rows,
)

DEFAULT_FAMILY = "llama_gqa_untied"
COVERED_BY_DEMO = "llama_gqa_tied"  # test_parity_run runs the demo's tied GQA Llama end to end


def _families(default: tuple[str, ...]):
    return [pytest.param(f, marks=() if f in default else pytest.mark.slow) for f in FAMILIES]


ALL = _families(tuple(f for f in FAMILIES if f != COVERED_BY_DEMO))
ONE = _families((DEFAULT_FAMILY,))


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", ALL)
def test_sft_loss_and_grads(pair, family, padding):
    lm = pair(family, "lm")
    assert_passed(sft_rows(lm, B.sft_batch(lm.vocab_size, padding), padding))


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", ALL)
def test_bradley_terry_loss_and_grads(pair, family, padding):
    value = pair(family, "value")
    batch = B.pairwise_batch(value.vocab_size, padding)
    rows = reward_rows(value, padding, pairwise=batch, losses=("bradley_terry",))
    assert {r.quantity.split("] ")[1] for r in rows} >= {"loss", "accuracy", "grad"}
    assert_passed(rows)


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", ONE)
def test_kway_ranking_loss_and_grads(pair, family, padding):
    value = pair(family, "value")
    batch = B.ranking_batch(value.vocab_size, padding)
    rows = reward_rows(value, padding, ranking=batch)
    assert [r.quantity.split("]")[1] for r in rows] == [" loss", " accuracy", " scores", " grad"]
    assert_passed(rows)




@pytest.mark.parametrize("family", ONE)
def test_dschat_pairwise_loss_and_grads(pair, family):
    # Right padding only: the loss finds each answer's end by searching for pad ids, which is
    # DeepSpeed-Chat's right-padded layout; on left-padded rows it reads fully-masked
    # positions whose outputs no backend defines.
    value = pair(family, "value")
    batch = B.pairwise_batch(value.vocab_size, "right")
    assert_passed(reward_rows(value, "right", pairwise=batch, losses=("dschat_pairwise",)))


def _rollout(pair, family, conventions):
    lm, value = pair(family, "lm"), pair(family, "value")
    prompts = B.forward_batch(lm.vocab_size, "left", width=6)  # left-padded prompts
    answers, mask = B.synthetic_answers(lm.vocab_size, 3, 4)  # right-padded answers
    return lm, value, rollout_for(lm, value, prompts["input_ids"], prompts["attention_mask"],
                                  answers, mask, conventions=conventions)


@pytest.mark.parametrize("family", ALL)
def test_ppo_actor_and_critic_losses_and_grads(pair, family):
    conventions = all_terms_conventions("default")
    lm, value, rollout = _rollout(pair, family, conventions)
    rows = ppo_rows(lm, value, rollout, conventions=conventions, entropy=False)
    names = {r.quantity.split("] ")[1] for r in rows if r.quantity.startswith("ppo actor")}
    assert {"loss", "pg_loss", "entropy", "kl_loss", "clip_fraction", "grad"} <= names
    assert_passed(rows)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deepspeed_chat", "openrlhf", "trl", "nemo"])
@pytest.mark.parametrize("family", ALL)
def test_ppo_losses_under_each_preset(pair, family, preset):
    conventions = all_terms_conventions(preset)
    lm, value, rollout = _rollout(pair, family, conventions)
    assert_passed(ppo_rows(lm, value, rollout, conventions=conventions, entropy=False))


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", ONE)
def test_entropy_and_ptx_losses_and_grads(pair, family, padding):
    lm = pair(family, "lm")
    _, _, rollout = _rollout(pair, family, all_terms_conventions("default"))
    rows = objective_rows("3", "entropy [rollout]", lm, obj.entropy_objective, rollout)
    rows += objective_rows("3", f"ptx [{padding}]", lm, obj.ptx_objective,
                           B.text_batch(lm.vocab_size, padding), unsup_coef=27.8)
    assert_passed(rows)


# Issue 11 part 1: the new losses on one family (-m slow adds the geometric TIS/MIS level).
@pytest.mark.parametrize("family", ONE)
def test_gspo_loss_and_grads(pair, family):
    lm, _, rollout = _rollout(pair, family, all_terms_conventions("default"))
    rows = objective_rows("3", "gspo actor [rollout]", lm, obj.gspo_actor_objective, rollout,
                          clip_low=0.03, clip_high=0.04)
    assert {r.quantity.split("] ")[1] for r in rows} >= {"loss", "grad", "seq_ratio_mean"}
    assert_passed(rows)


@pytest.mark.parametrize("level", ["token", pytest.param("geometric", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ONE)
def test_rollout_corrected_loss_and_grads(pair, family, level):
    lm, _, rollout = _rollout(pair, family, all_terms_conventions("default"))
    rng = np.random.default_rng(11)
    mask = rollout["response_mask"]
    corrected = dict(rollout, rollout_logprobs=(
        rollout["old_logprobs"] + rng.normal(0.0, 0.4, mask.shape) * mask).astype(np.float32))
    rows = objective_rows("3", f"tis+mis {level} [rollout]", lm,
                          obj.rollout_corrected_actor_objective, corrected,
                          threshold=1.5, ratio_level=level, mis_threshold=2.0)
    assert {r.quantity.split("] ")[1] for r in rows} >= {"loss", "grad", "kept", "gap/k3_kl"}
    assert_passed(rows)


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", ONE)
def test_dpo_loss_and_grads(pair, family, padding):
    lm = pair(family, "lm")
    rng = np.random.default_rng(12)
    batch = dict(B.pairwise_batch(lm.vocab_size, padding, prompt_tokens=4),
                 ref_chosen_logprobs=rng.normal(-20.0, 2.0, 3).astype(np.float32),
                 ref_rejected_logprobs=rng.normal(-20.0, 2.0, 3).astype(np.float32))
    rows = objective_rows("3", f"dpo sigmoid [{padding}]", lm, obj.dpo_objective, batch,
                          prompt_tokens=4, beta=0.1, label_smoothing=0.1)
    rows += objective_rows("3", f"dpo ipo [{padding}]", lm, obj.dpo_objective, batch,
                           prompt_tokens=4, beta=0.5, loss_type="ipo")
    assert {r.quantity.split("] ")[1] for r in rows} >= {"loss", "grad", "rewards/margins"}
    assert_passed(rows)
