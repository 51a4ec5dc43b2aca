"""shared.rollout: keyed uniforms, mini-batch schedules, short answers, step counts."""

from __future__ import annotations

import numpy as np
import pytest

from shared.rollout import (
    minibatch_schedule,
    ppo_update_counts,
    sampling_uniforms,
    short_answer_mask,
)


def test_uniforms_are_keyed_not_sequential():
    a = sampling_uniforms(1, 3, 0, shape=(4, 5))
    assert a.dtype == np.float32 and a.shape == (4, 5)
    assert ((a >= 0) & (a < 1)).all()
    np.testing.assert_array_equal(a, sampling_uniforms(1, 3, 0, shape=(4, 5)))
    for other in [(2, 3, 0), (1, 4, 0), (1, 3, 1)]:
        assert not np.array_equal(a, sampling_uniforms(*other, shape=(4, 5)))
    assert not np.array_equal(a, sampling_uniforms(1, 3, 0, shape=(4, 5), rank=1))


def test_dschat_schedule_walks_in_order():
    schedule = minibatch_schedule(6, 2, ppo_epochs=2, shuffle=False)
    assert [[m.tolist() for m in epoch] for epoch in schedule] == [[[0, 1], [2, 3], [4, 5]]] * 2


def test_shuffled_schedule_covers_each_row_once_per_epoch():
    schedule = minibatch_schedule(12, 4, ppo_epochs=3, shuffle=True, seed=7, iteration=2)
    for epoch in schedule:
        assert sorted(np.concatenate(epoch).tolist()) == list(range(12))
    assert not np.array_equal(np.concatenate(schedule[0]), np.concatenate(schedule[1]))
    again = minibatch_schedule(12, 4, ppo_epochs=3, shuffle=True, seed=7, iteration=2)
    assert all(np.array_equal(x, y) for e, f in zip(schedule, again, strict=True)
               for x, y in zip(e, f, strict=True))


def test_schedule_refuses_a_ragged_split():
    with pytest.raises(ValueError, match="do not split"):
        minibatch_schedule(10, 4, ppo_epochs=1, shuffle=False)


def test_short_answers_are_masked_and_counted():
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=np.float32)
    new_mask, short = short_answer_mask(mask, min_tokens=2)
    assert short.tolist() == [False, True, True, False]
    np.testing.assert_array_equal(new_mask, [[1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]])


def test_short_answer_mask_runs_on_torch_and_jax():
    import jax
    import torch

    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.float32)
    expected, _ = short_answer_mask(mask, min_tokens=2)
    got_t, _ = short_answer_mask(torch.tensor(mask), min_tokens=2)
    got_j, _ = jax.jit(lambda m: short_answer_mask(m, min_tokens=2))(mask)
    np.testing.assert_array_equal(got_t.numpy(), expected)
    np.testing.assert_array_equal(np.asarray(got_j), expected)


def test_update_counts():
    counts = ppo_update_counts(num_prompts=320, world_size=1, generation_batch_size=64,
                               generation_batches=1, training_batch_size=32, ppo_epochs=2,
                               gradient_accumulation_steps=1, num_train_epochs=4)
    # 320 prompts / 64 per iteration = 5 iterations per epoch; 2 epochs x 2 mini-batches.
    assert counts == (4, 4, 80)
    capped = ppo_update_counts(num_prompts=320, world_size=2, generation_batch_size=64,
                               generation_batches=1, training_batch_size=32, ppo_epochs=2,
                               gradient_accumulation_steps=2, num_train_epochs=4,
                               max_iterations=3)
    assert capped == (4, 2, 6)
    # max_iterations overrides num_train_epochs (2 iterations per epoch here): 7 iterations
    longer = ppo_update_counts(num_prompts=320, world_size=2, generation_batch_size=64,
                               generation_batches=1, training_batch_size=32, ppo_epochs=2,
                               gradient_accumulation_steps=2, num_train_epochs=1,
                               max_iterations=7)
    assert longer == (4, 2, 14)
