"""Level 2: the same HF weights give the same logits, token log-probs, entropies, values and
reward end scores in both backends, for every family, on right- and left-padded batches."""

from __future__ import annotations

import pytest

from parity_tests import batches as B
from parity_tests.harness import FAMILIES, assert_passed
from parity_tests.levels import forward_rows


@pytest.mark.parametrize("padding", B.PADDINGS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward(pair, family, padding):
    lm, value = pair(family, "lm"), pair(family, "value")
    batch = B.forward_batch(lm.vocab_size, padding)
    width = batch["input_ids"].shape[1]
    # End scores: torch reads the token before the answer's first pad; with left padding the
    # whole row is "prompt" up to its last token.
    prompt_length = 1 if padding == "right" else width - 1
    rows = forward_rows(padding, batch["input_ids"], batch["attention_mask"], lm=lm,
                        value=value, prompt_length=prompt_length)
    assert len(rows) == 5
    assert_passed(rows)
