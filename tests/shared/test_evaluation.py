"""shared.evaluation on the demo tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from shared.evaluation import (
    decode_answers,
    format_prompt_eval,
    format_reward_eval,
    model_kind,
    reward_eval_summary,
    score_answers,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "demo" / "tokenizer"


def test_decode_stops_at_eos_and_respects_the_mask():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    one, nine = tok.convert_tokens_to_ids(["1", "9"])
    ids = np.array([[one, nine, eos, pad], [nine, eos, one, one], [one, one, one, one]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert decode_answers(tok, ids, mask) == ["19", "9", "11"]


def test_score_answers_arithmetic():
    assert score_answers("arithmetic_accuracy", ["1+2=", "3+4="], ["3", "8"]) == 0.5
    with pytest.raises(ValueError, match="eval.metric"):
        score_answers("bleu", ["1+2="], ["3"])


def test_heldout_uniforms_rows_are_a_prefix_and_prompt_major():
    from shared.evaluation import HELDOUT_ITERATION, heldout_uniforms
    from shared.rollout import sampling_uniforms

    u = heldout_uniforms(3, rows=6, max_new_tokens=5)
    assert u.shape == (6, 5) and u.dtype == np.float32
    np.testing.assert_array_equal(u, sampling_uniforms(3, HELDOUT_ITERATION, 0, shape=(6, 5)))
    # padding rows (torch's world-size filler, JAX's last chunk) leave the real rows unchanged
    np.testing.assert_array_equal(heldout_uniforms(3, rows=8, max_new_tokens=5)[:6], u)
    assert not np.array_equal(heldout_uniforms(4, rows=6, max_new_tokens=5), u)


def test_model_kind_reads_config_architectures(tmp_path):
    import json

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(
        json.dumps({"architectures": ["OPTForSequenceClassification"]}))
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"]}))
    assert model_kind(tmp_path / "rm") == "reward"
    assert model_kind(tmp_path / "lm") == "policy"
    assert model_kind("facebook/opt-125m") == "policy"  # a hub name: not read here


def test_reward_eval_summary_by_hand():
    # pairs (2, 1), (0, 1), (3, -1): two of three chosen above rejected; margins 1, -1, 4.
    summary = reward_eval_summary(np.array([2.0, 0.0, 3.0]), np.array([1.0, 1.0, -1.0]))
    assert summary["pairs"] == 3 and summary["pair_accuracy"] == pytest.approx(2 / 3)
    assert summary["chosen"] == {"mean": pytest.approx(5 / 3), "std": pytest.approx(
        np.std([2, 0, 3])), "min": 0.0, "max": 3.0}
    assert summary["margin"]["mean"] == pytest.approx(4 / 3)
    assert summary["margin"]["min"] == -1.0 and summary["margin"]["max"] == 4.0
    with pytest.raises(ValueError, match="equal non-empty"):
        reward_eval_summary(np.zeros(2), np.zeros(3))


def test_reports_end_with_one_json_line():
    import json

    text = format_reward_eval("rm", ["a", "b"], np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert json.loads(text.splitlines()[-1])["pair_accuracy"] == 0.5
    assert "pair accuracy (chosen > rejected): 0.5000" in text
    text = format_prompt_eval({"baseline": "b", "finetune": "f"}, ["1+1="], ["2"],
                              {"baseline": ["3"], "finetune": ["2"]},
                              {"baseline": {"acc": 0.0}, "finetune": {"acc": 1.0}})
    lines = text.splitlines()
    assert lines[:4] == ["==== prompt 0: 1+1=", "  expected | 2", "  baseline | 3",
                         "  finetune | 2"]
    assert json.loads(lines[-1]) == {"baseline": "b", "finetune": "f", "kind": "policy",
                                     "heldout": {"baseline": {"acc": 0.0},
                                                 "finetune": {"acc": 1.0}}}
    one = format_prompt_eval({"model": "m"}, ["1+1="], None, {"model": ["2"]}, {"model": {}})
    assert json.loads(one.splitlines()[-1]) == {"model": "m", "kind": "policy", "heldout": {}}
    assert "expected" not in one


def test_eval_roles_name_the_flag_at_fault(tmp_path):
    """`rlhf eval`'s model choice, the same for both backends."""
    import types

    from shared.errors import InputError
    from shared.evaluation import eval_roles

    config = types.SimpleNamespace(model=types.SimpleNamespace(actor_model_name_or_path=None))
    args = types.SimpleNamespace(model=None, model_baseline=None, model_finetune=None)
    with pytest.raises(InputError, match="pass --model DIR"):
        eval_roles(config, args)
    assert eval_roles(config, types.SimpleNamespace(model="m")) == {"model": "m"}
    with pytest.raises(InputError, match="go together"):
        eval_roles(config, types.SimpleNamespace(model_baseline="a", model_finetune=None))
    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "config.json").write_text(
        '{"architectures": ["LlamaForSequenceClassification"]}')
    with pytest.raises(InputError, match="--model-finetune: .* is a reward model"):
        eval_roles(config, types.SimpleNamespace(model_baseline="a", model_finetune=reward))
    assert eval_roles(config, types.SimpleNamespace(model_baseline="a", model_finetune="b")) == {
        "baseline": "a", "finetune": "b"}
