"""Hugging Face adapters, each read from a tiny local fixture in its hub schema.

The fixtures copy the column layout DeepSpeed-Chat's raw_datasets.py reads (one row each is
enough to pin the prompt/response split). They are loaded through `datasets.load_dataset` on a
local directory, the same code path as a hub name, with the adapter picked by `adapter=`.
"""

import pytest

from shared.data import (
    ADAPTERS,
    DataConfig,
    DataError,
    DatasetSpec,
    PairwiseExample,
    pipeline,
    read_dataset,
)

HH_CHOSEN = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: Knock knock."
HH_REJECTED = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant: No."

FIXTURES = {
    "Dahoas/rm-static": (
        {
            "prompt": "\n\nHuman: Why?\n\nAssistant:",
            "response": " Because.",
            "chosen": " Because.",
            "rejected": " No idea.",
        },
        PairwiseExample("\n\nHuman: Why?\n\nAssistant:", " Because.", " No idea."),
    ),
    "Dahoas/full-hh-rlhf": (
        {
            "prompt": "\n\nHuman: Hi\n\nAssistant:",
            "response": " Hey",
            "chosen": " Hey",
            "rejected": " Go away",
        },
        PairwiseExample("\n\nHuman: Hi\n\nAssistant:", " Hey", " Go away"),
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Chair."},
        PairwiseExample(" Human: Name a fruit. Assistant:", " Apple.", " Chair."),
    ),
    "yitingxie/rlhf-reward-datasets": (
        {
            "prompt": "\n\nHuman: Why?\n\n",
            "chosen": "Assistant: Because.",
            "rejected": "Assistant: No idea.",
        },
        PairwiseExample("\n\nHuman: Why?\n\nAssistant:", " Because.", " No idea."),
    ),
    "Anthropic/hh-rlhf": (
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        PairwiseExample(
            "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Joke?\n\nAssistant:",
            " Knock knock.",
            " No.",
        ),
    ),
}


def test_registry_covers_the_deepspeed_chat_and_anthropic_datasets():
    assert set(FIXTURES) <= set(ADAPTERS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_adapter_on_local_fixture_dir(name, write_jsonl, tmp_path):
    row, expected = FIXTURES[name]
    write_jsonl("hub/train.jsonl", [row, row])
    write_jsonl("hub/test.jsonl", [row])
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    records, report = read_dataset(DatasetSpec(str(tmp_path / "hub"), adapter=name), config)
    assert records == [expected, expected]
    assert report.get(f"{tmp_path / 'hub'}[train]/records") == 2
    records, _ = read_dataset(
        DatasetSpec(str(tmp_path / "hub"), adapter=name, hf_split="test"), config
    )
    assert records == [expected]


def test_adapter_on_local_jsonl_file_keeps_line_numbers(write_jsonl):
    path = write_jsonl("hh.jsonl", [{"chosen": HH_CHOSEN}])
    with pytest.raises(DataError, match=f"{path}:1: missing field 'rejected'"):
        read_dataset(DatasetSpec(path, adapter="Anthropic/hh-rlhf"))


def test_hh_rows_without_a_common_prompt_are_skipped_and_counted(write_jsonl):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: A", "rejected": "\n\nHuman: B"},
    ]
    path = write_jsonl("hh.jsonl", rows)
    records, report = read_dataset(DatasetSpec(path, adapter="Anthropic/hh-rlhf"))
    assert len(records) == 1
    assert report.get(f"{path}/skipped/no_common_prompt") == 1


def test_hub_name_selects_its_adapter(monkeypatch, tmp_path):
    """A registered hub name goes through load_hf_dataset and its adapter (network stubbed)."""
    import datasets

    row, expected = FIXTURES["Anthropic/hh-rlhf"]
    local = datasets.Dataset.from_list([row])
    calls = []

    def fake_load(path, name, split, cache_dir):
        calls.append((path, name, split))
        return local

    monkeypatch.setattr(pipeline, "load_hf_dataset", fake_load)
    records, report = read_dataset(DatasetSpec("Anthropic/hh-rlhf", hf_split="test"))
    assert records == [expected]
    assert calls == [("Anthropic/hh-rlhf", None, "test")]
    assert report.get("Anthropic/hh-rlhf[test]/records") == 1


def test_hf_dir_without_adapter_detects_format(write_jsonl, tmp_path):
    write_jsonl("d/train.jsonl", [{"prompt": "P", "response": "R"}])
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    records, _ = read_dataset(DatasetSpec(str(tmp_path / "d")), config)
    assert [(r.prompt, r.response) for r in records] == [("P", "R")]


def test_save_to_disk_dir_and_parquet_file(tmp_path):
    import datasets

    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    for path in (tmp_path / "saved", tmp_path / "rows.parquet"):
        records, _ = read_dataset(DatasetSpec(str(path)), config)
        assert records == [PairwiseExample("P", "a", "b")]


def test_missing_split_and_bad_rows_name_the_dataset(write_jsonl, tmp_path):
    write_jsonl("d/train.jsonl", [{"prompt": "P", "chosen": 3, "rejected": "b"}])
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"\[train\] row 0: field 'chosen' must be a string"):
        read_dataset(DatasetSpec(str(tmp_path / "d"), format="pairwise"), config)
    with pytest.raises(DataError, match="could not load"):
        read_dataset(DatasetSpec(str(tmp_path / "d"), hf_split="validation"), config)
