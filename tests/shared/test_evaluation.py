"""shared.evaluation on the demo tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from shared.evaluation import decode_answers, score_answers

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
