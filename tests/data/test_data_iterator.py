"""BatchIterator: seeded epochs, drop_last accounting, exact resume from saved state."""

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.data import BatchIterator, PromptBatch, SFTBatch


def make_data(n: int) -> SFTBatch:
    """Example i has input_ids row [i, i, i] so batches show which examples they hold."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], 3, axis=1)
    return SFTBatch(ids, np.ones_like(ids), np.ones_like(ids))


def served(batches) -> list[list[int]]:
    return [b.input_ids[:, 0].tolist() for b in batches]


def test_epoch_without_drop_last_covers_every_example_once():
    it = BatchIterator(make_data(10), 4, seed=0, drop_last=False)
    batches = served(it)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    assert it.batches_per_epoch == 3 and it.dropped_per_epoch == 0


def test_drop_last_serves_full_batches_and_reports_the_drop(caplog):
    with caplog.at_level(logging.INFO, logger="shared.data"):
        it = BatchIterator(make_data(10), 4, seed=0, drop_last=True, name="sft train")
    assert "sft train: 10 examples, batch size 4, 2 batches per epoch" in caplog.text
    assert "drops 2 examples per epoch" in caplog.text
    batches = served(it)
    assert [len(b) for b in batches] == [4, 4]
    assert it.dropped_per_epoch == 2


def test_epochs_reshuffle_deterministically():
    it = BatchIterator(make_data(12), 4, seed=3)
    first, second = served(it), served(it)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    again = BatchIterator(make_data(12), 4, seed=3)
    assert served(again) == first and served(again) == second
    assert served(BatchIterator(make_data(12), 4, seed=4)) != first


def test_shuffle_false_keeps_order():
    it = BatchIterator(make_data(5), 2, seed=0, shuffle=False, drop_last=False)
    assert served(it) == [[0, 1], [2, 3], [4]]


def test_next_batch_crosses_epochs():
    it = BatchIterator(make_data(6), 4, seed=0)
    for _ in range(3):
        it.next_batch()
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["position"] == 1


def test_take_keeps_optional_string_fields():
    data = PromptBatch(
        np.zeros((3, 2), np.int32), np.ones((3, 2), np.int32), np.array(["a", "b", "c"]), None
    )
    batch = next(iter(BatchIterator(data, 2, seed=0, shuffle=False)))
    assert batch.prompt_text.tolist() == ["a", "b"] and batch.reference is None


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    batch_size=st.integers(1, 8),
    consumed=st.integers(0, 20),
    drop_last=st.booleans(),
)
def test_restored_iterator_serves_identical_batches(n, batch_size, consumed, drop_last):
    drop_last = drop_last and batch_size <= n
    original = BatchIterator(make_data(n), batch_size, seed=11, drop_last=drop_last)
    for _ in range(consumed):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    restored = BatchIterator(make_data(n), batch_size, seed=11, drop_last=drop_last)
    restored.load_state_dict(state)
    expected = [original.next_batch() for _ in range(7)]
    assert served(restored.next_batch() for _ in range(7)) == served(expected)


def test_restore_mid_epoch_then_for_loop_finishes_that_epoch():
    it = BatchIterator(make_data(10), 2, seed=5)
    full = served(BatchIterator(make_data(10), 2, seed=5))
    next(iter(it))
    next(iter(it))
    restored = BatchIterator(make_data(10), 2, seed=5)
    restored.load_state_dict(it.state_dict())
    assert served(restored) == full[2:]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"epoch": 0, "position": 0, "num_examples": 9}, "num_examples=9"),
        ({"epoch": 0, "position": 0, "batch_size": 3}, "batch_size=3"),
        ({"epoch": 0, "position": 0, "seed": 2}, "seed=2"),
        ({"epoch": 0, "position": 99}, "out of range"),
    ],
)
def test_mismatched_state_is_refused(state, message):
    it = BatchIterator(make_data(10), 2, seed=1)
    with pytest.raises(ValueError, match=message):
        it.load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 5 examples"):
        BatchIterator(make_data(5), 8, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="empty dataset"):
        BatchIterator(make_data(0), 1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(make_data(5), 0, seed=0)
