import math

import numpy as np
import pytest

from shared import sft_loss, sft_loss_mask


def test_sft_loss_golden(run):
    # Uniform logits over V = 4: every token costs ln 4; the masked one (label -100) is ignored.
    logits = run.asarray(np.zeros((1, 3, 4)))
    labels = run.asarray([[1, 2, -100]])
    mask = run.asarray([[1.0, 1.0, 0.0]])
    assert run.call(sft_loss, logits, labels, mask) == pytest.approx(math.log(4.0))


def test_sft_loss_matches_cross_entropy():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 5, 7), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3:] = -100
    mask = labels != -100
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(sft_loss(logits, labels, mask).item(), expected.item(), rtol=1e-12)


def test_sft_loss_mask_prompt_lengths(run):
    attention = run.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # Label j is token j + 1. Row 0: tokens 0-1 prompt, 2-3 answer, 4 padding.
    out = run.call(sft_loss_mask, attention, run.asarray([2, 1]), train_on_prompt=False)
    np.testing.assert_array_equal(out, [[0, 1, 1, 0], [1, 1, 1, 1]])
    out = run.call(sft_loss_mask, attention, run.asarray([2, 1]), train_on_prompt=True)
    np.testing.assert_array_equal(out, [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_sft_loss_mask_prompt_mask_left_padded(run):
    attention = run.asarray([[0, 1, 1, 1, 1]])
    prompt = run.asarray([[0.0, 1.0, 1.0, 0.0, 0.0]])
    out = run.call(sft_loss_mask, attention, prompt, train_on_prompt=False)
    np.testing.assert_array_equal(out, [[0, 0, 1, 1]])


def test_sft_loss_mask_errors(run):
    with pytest.raises(ValueError, match="prompt_lengths_or_mask"):
        sft_loss_mask(run.asarray([[1, 1]]), run.asarray([1, 2]), train_on_prompt=False)
