"""Step partitions (DeepSpeed-Chat's data_split), eval hold-out, weights and blending."""

import numpy as np
import pytest
from data_helpers import pairwise_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.data import DataConfig, DataError, DatasetSpec, build_step_data
from shared.data.splits import hold_out, partition, permutation, reweight, split_sizes

# --- index arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shares", "sizes"),
    [
        (10, (2, 4, 4), [2, 4, 4]),  # hand-checked: 0.2 * 10, 0.4 * 10, 0.4 * 10
        (7, (2, 4, 4), [1, 3, 3]),  # bounds round(1.4)=1, round(4.2)=4, 7
        (3, (2, 4, 4), [1, 1, 1]),  # bounds round(0.6)=1, round(1.8)=2, 3
        (5, (10, 0, 0), [5, 0, 0]),
        (3, (0, 1, 1), [0, 2, 1]),  # bounds 0, round(1.5)=2, 3; DS-Chat gives [-1, 2, 2] here
        (1, (0, 1, 1), [0, 1, 0]),
    ],
)
def test_split_sizes_golden(n, shares, sizes):
    assert split_sizes(n, shares) == sizes


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    shares=st.lists(st.integers(0, 10), min_size=3, max_size=3).filter(lambda s: sum(s) > 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_is_disjoint_covering_and_respects_zero_shares(n, shares, seed):
    parts = partition(n, shares, seed)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))
    for part, share in zip(parts, shares, strict=True):
        if share == 0:
            assert len(part) == 0
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(n, shares, seed), strict=True))


def test_permutation_matches_deepspeed_chat_shuffle_idx():
    """DS-Chat's get_shuffle_idx: RandomState(seed).shuffle(np.arange(size, dtype=uint32))."""
    expected = np.arange(0, 50, 1, dtype=np.uint32)
    np.random.RandomState(seed=1234).shuffle(expected)
    np.testing.assert_array_equal(permutation(50, 1234), expected.astype(np.int64))


def test_seed_changes_partition():
    a = partition(100, (2, 4, 4), 1)
    b = partition(100, (2, 4, 4), 2)
    assert not np.array_equal(a[0], b[0])


@pytest.mark.parametrize(
    ("m", "fraction", "n_eval"),
    [(100, 0.05, 5), (10, 0.05, 1), (1, 0.5, 0), (2, 0.9, 1), (10, 0.0, 0)],
)
def test_hold_out_sizes(m, fraction, n_eval):
    train, evals = hold_out(np.arange(m), fraction)
    assert len(evals) == n_eval and len(train) == m - n_eval
    assert set(train.tolist()).isdisjoint(evals.tolist())


@pytest.mark.parametrize(("n", "weight", "total"), [(10, 1.0, 10), (10, 0.5, 5), (10, 2.5, 25)])
def test_reweight(n, weight, total):
    idx = reweight(n, weight, 7)
    assert len(idx) == total
    counts = np.bincount(idx, minlength=n)
    assert counts.min() >= int(weight) and counts.max() <= int(weight) + 1
    np.testing.assert_array_equal(idx, reweight(n, weight, 7))


# --- through the pipeline -----------------------------------------------------------------


def step_prompts(config, tokenizer, step):
    data = build_step_data(config, tokenizer, step)
    batches = [data.train] + ([data.eval] if data.eval is not None else [])
    texts = []
    for batch in batches:
        if step == "ppo":
            texts.extend(batch.prompt_text.tolist())
            continue
        ids = batch.input_ids if step == "sft" else batch.chosen_input_ids
        for row in ids:
            text = tokenizer.decode(row, skip_special_tokens=True)
            texts.append(text[: text.index("?") + 1])
    return data, texts


def test_steps_get_disjoint_shares_of_one_dataset(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(50))
    config = DataConfig(datasets=(DatasetSpec(path),), max_seq_len=32, eval_fraction=0.1)
    seen = {}
    for step in ("sft", "reward", "ppo"):
        data, texts = step_prompts(config, tokenizer, step)
        seen[step] = texts
        assert len(set(texts)) == len(texts)
    assert [len(seen[s]) for s in ("sft", "reward", "ppo")] == [10, 20, 20]
    assert set(seen["sft"]).isdisjoint(seen["reward"])
    assert set(seen["reward"]).isdisjoint(seen["ppo"])
    assert set(seen["sft"]) | set(seen["reward"]) | set(seen["ppo"]) == {
        f"q{i}?" for i in range(50)
    }
    _, again = step_prompts(config, tokenizer, "reward")
    assert again == seen["reward"]  # deterministic, same order


def test_eval_is_disjoint_from_train(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(40))
    config = DataConfig(datasets=(DatasetSpec(path),), data_split="0,0,1", eval_fraction=0.25)
    data = build_step_data(config, tokenizer, "ppo")
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert set(data.train.prompt_text).isdisjoint(data.eval.prompt_text)
    assert data.report.get(f"{path}/ppo/eval") == 10


def test_steps_subset_takes_the_whole_dataset(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(20))
    config = DataConfig(datasets=(DatasetSpec(path, steps=("reward",)),), eval_fraction=0)
    data = build_step_data(config, tokenizer, "reward")
    assert len(data.train) == 20 and data.eval is None
    with pytest.raises(DataError, match="no dataset feeds step 'sft'"):
        build_step_data(config, tokenizer, "sft")


def test_prompt_only_data_feeds_only_ppo(write_jsonl, tokenizer):
    prompts = write_jsonl("q.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    pairs = write_jsonl("p.jsonl", pairwise_rows(10))
    config = DataConfig(datasets=(DatasetSpec(prompts), DatasetSpec(pairs)), eval_fraction=0)
    data = build_step_data(config, tokenizer, "ppo")
    assert data.report.get(f"{prompts}/ppo/train") == 10  # all of it: it feeds only ppo
    assert data.report.get(f"{pairs}/ppo/train") == 4  # its 0.4 share
    assert len(data.train) == 14


def test_blending_with_weights(write_jsonl, tokenizer):
    a = write_jsonl("a.jsonl", pairwise_rows(10, "a"))
    b = write_jsonl("b.jsonl", pairwise_rows(10, "b"))
    config = DataConfig(
        datasets=(
            DatasetSpec(a, steps=("reward",), weight=2.0),
            DatasetSpec(b, steps=("reward",), weight=0.5),
        ),
        eval_fraction=0,
    )
    data = build_step_data(config, tokenizer, "reward")
    texts = [tokenizer.decode(r, skip_special_tokens=True)[0] for r in data.train.chosen_input_ids]
    assert texts.count("a") == 20 and texts.count("b") == 5
    assert texts != sorted(texts)  # blended by a seeded shuffle, not concatenated


def test_eval_only_dataset_replaces_eval_fraction(write_jsonl, tokenizer):
    train = write_jsonl("q.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    held = write_jsonl("e.jsonl", [{"prompt": f"e{i}", "answer": str(i)} for i in range(4)])
    config = DataConfig(
        datasets=(DatasetSpec(train), DatasetSpec(held, eval_only=True)), eval_fraction=0.5
    )
    data = build_step_data(config, tokenizer, "ppo")
    assert len(data.train) == 10  # nothing held out from the training prompts
    assert data.eval.prompt_text.tolist() == [f"e{i}" for i in range(4)]
    assert data.eval.reference.tolist() == [str(i) for i in range(4)]
    assert data.train.reference is None


def test_empty_after_split_names_the_dataset(write_jsonl, tokenizer):
    path = write_jsonl("tiny.jsonl", pairwise_rows(1))
    config = DataConfig(datasets=(DatasetSpec(path),), eval_fraction=0)
    # one record, shares 0.2/0.4/0.4: bounds round(0.2)=0, round(0.6)=1, 1 -> sizes 0, 1, 0
    assert len(build_step_data(config, tokenizer, "reward").train) == 1
    with pytest.raises(DataError, match=f"{path}: empty after split.*step 'sft'"):
        build_step_data(config, tokenizer, "sft")


def test_empty_eval_after_split_is_an_error(write_jsonl, tokenizer):
    path = write_jsonl("tiny.jsonl", pairwise_rows(1))
    config = DataConfig(datasets=(DatasetSpec(path, steps=("sft",)),), eval_fraction=0.1)
    with pytest.raises(DataError, match="step 'sft': eval set empty after split"):
        build_step_data(config, tokenizer, "sft")


def test_listed_step_with_zero_share_is_an_error(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(5))
    config = DataConfig(datasets=(DatasetSpec(path, steps=("ppo",)),), data_split="1,1,0")
    with pytest.raises(DataError, match=r"lists step\(s\) \['ppo'\].*zero share"):
        build_step_data(config, tokenizer, "ppo")


def test_incompatible_step_is_an_error(write_jsonl, tokenizer):
    path = write_jsonl("q.jsonl", [{"prompt": "p"}])
    config = DataConfig(datasets=(DatasetSpec(path, steps=("reward",)),))
    with pytest.raises(DataError, match="PromptExample records cannot feed step"):
        build_step_data(config, tokenizer, "reward")


def test_text_in_datasets_points_to_unsupervised(write_text, tokenizer):
    path = write_text("t.txt", "a\nb\n")
    config = DataConfig(datasets=(DatasetSpec(path),))
    with pytest.raises(DataError, match="unsupervised_dataset_name"):
        build_step_data(config, tokenizer, "sft")


def test_no_datasets(tokenizer):
    with pytest.raises(DataError, match="datasets is empty"):
        build_step_data(DataConfig(), tokenizer, "sft")
    with pytest.raises(ValueError, match="allowed: sft, reward, ppo"):
        build_step_data(DataConfig(), tokenizer, "rm")


def test_weight_that_leaves_nothing_is_an_error(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(4))
    config = DataConfig(datasets=(DatasetSpec(path, steps=("sft",), weight=0.1),), eval_fraction=0)
    with pytest.raises(DataError, match=f"{path}: weight 0.1 leaves none"):
        build_step_data(config, tokenizer, "sft")
