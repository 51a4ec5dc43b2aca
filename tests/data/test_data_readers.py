"""Local formats and every bad-input case: errors name file and line, skips are counted."""

import json

import pytest

from shared.data import (
    DataConfig,
    DataError,
    DatasetSpec,
    PairwiseExample,
    PromptExample,
    RankingExample,
    SFTExample,
    TextExample,
    read_dataset,
)
from shared.data.readers import split_common_prompt


def read(path, fmt="auto", **config):
    return read_dataset(DatasetSpec(path, format=fmt), DataConfig(**config))


# --- every format -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "pairwise"])
def test_pairwise_jsonl(write_jsonl, fmt):
    path = write_jsonl("p.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])
    records, _ = read(path, fmt)
    assert records == [PairwiseExample("Q", " a", " b")]


def test_pairwise_json_array_like_deepspeed_chat_local_json(write_text):
    rows = [
        {"prompt": "Q1", "chosen": "a", "rejected": "b"},
        {"prompt": "Q2", "chosen": "c", "rejected": "d"},
    ]
    path = write_text("train.json", json.dumps(rows, indent=2))
    records, _ = read(path)
    assert records == [PairwiseExample("Q1", "a", "b"), PairwiseExample("Q2", "c", "d")]


def test_json_file_holding_json_lines(write_text):
    path = write_text("lines.json", '{"prompt": "Q"}\n{"prompt": "R"}\n')
    assert read(path)[0] == [PromptExample("Q"), PromptExample("R")]


def test_ranking(write_jsonl):
    path = write_jsonl("r.jsonl", [{"prompt": "Q", "responses": ["best", "mid", "worst"]}])
    records, _ = read(path)
    assert records == [RankingExample("Q", ("best", "mid", "worst"))]


@pytest.mark.parametrize(
    "row",
    [{"prompt": "Q", "response": "A"}, {"prompt": "Q", "chosen": "A"}],
    ids=["response", "chosen"],
)
def test_sft(write_jsonl, row):
    path = write_jsonl("s.jsonl", [row])
    assert read(path)[0] == [SFTExample("Q", "A")]
    assert read(path, "sft")[0] == [SFTExample("Q", "A")]


def test_prompt_with_optional_reference(write_jsonl):
    path = write_jsonl(
        "q.jsonl",
        [{"prompt": "1+1="}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "x", "reference": "y"}],
    )
    assert read(path)[0] == [
        PromptExample("1+1="),
        PromptExample("2+2=", "4"),
        PromptExample("x", "y"),
    ]


def test_text_txt_counts_blank_lines(write_text):
    path = write_text("t.txt", "one\n\ntwo\n   \nthree\n")
    records, report = read(path)
    assert records == [TextExample("one"), TextExample("two"), TextExample("three")]
    assert report.get(f"{path}/skipped/blank_line") == 2


def test_text_jsonl(write_jsonl):
    path = write_jsonl("t.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    assert read(path, "text")[0] == [TextExample("doc one"), TextExample("doc two")]


def test_nemo_comparisons_pair_lines(write_jsonl):
    sep = "\nAssistant:"
    path = write_jsonl(
        "c.jsonl",
        [
            {"text": "User: When?\nAssistant: 31 August 2000"},
            {"text": "User: When?\nAssistant: I refuse."},
            {"text": "User: 6*10?\nAssistant: 60"},
            {"text": "User: 6*10?\nAssistant: 90"},
        ],
    )
    records, _ = read(path, "nemo_comparison", prompt_response_separator=sep)
    assert records == [
        PairwiseExample("User: When?\nAssistant:", " 31 August 2000", " I refuse."),
        PairwiseExample("User: 6*10?\nAssistant:", " 60", " 90"),
    ]


def test_nemo_prompt_is_split_at_last_separator(write_jsonl):
    path = write_jsonl("c.jsonl", [{"text": "1+1=2, 2+2=4"}, {"text": "1+1=2, 2+2=5"}])
    records, _ = read(path, "nemo_comparison", prompt_response_separator="=")
    assert records == [PairwiseExample("1+1=2, 2+2=", "4", "5")]


def test_split_common_prompt():
    assert split_common_prompt("P: a\nA: x", "P: a\nA: y", "\nA:") == ("P: a\nA:", " x", " y")
    assert split_common_prompt("abc", "abd", "\nA:") is None


# --- skipped rows are counted -------------------------------------------------------------


def test_skips_are_counted_not_silent(write_jsonl):
    path = write_jsonl(
        "p.jsonl",
        [
            {"prompt": "Q", "chosen": "a", "rejected": "b"},
            {"prompt": None, "chosen": "a", "rejected": "b"},
            {"prompt": "Q", "chosen": "  ", "rejected": "b"},
            {"prompt": "Q", "chosen": "same", "rejected": "same"},
            "",
        ],
    )
    records, report = read(path)
    assert len(records) == 1
    assert report.get(f"{path}/skipped/null_field") == 1
    assert report.get(f"{path}/skipped/empty_response") == 1
    assert report.get(f"{path}/skipped/identical_responses") == 1
    assert report.get(f"{path}/skipped/blank_line") == 1
    assert "skipped/null_field: 1" in report.summary()


def test_every_row_skipped_is_an_error(write_jsonl):
    path = write_jsonl("p.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no usable rows"):
        read(path)


# --- bad input: errors name file and line -------------------------------------------------


def test_malformed_json_line_names_file_and_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c",'])
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        read(path)


def test_malformed_json_array_names_line(write_text):
    path = write_text("bad.json", '[\n  {"prompt": "a"},\n  {"prompt": "b",}\n]')
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        read(path)


def test_json_array_missing_comma_names_line(write_text):
    path = write_text("bad.json", '[\n  {"prompt": "a"}\n  {"prompt": "b"}\n]')
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON .*expected ','"):
        read(path)


def test_missing_field_names_file_line_and_field(write_jsonl):
    path = write_jsonl(
        "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}]
    )
    with pytest.raises(DataError, match=f"{path}:2: missing field 'rejected'.*found: chosen"):
        read(path, "pairwise")


def test_wrong_type_names_file_line_and_type(write_jsonl):
    path = write_jsonl("s.jsonl", [{"prompt": "Q", "response": 19}])
    with pytest.raises(DataError, match=f"{path}:1: field 'response' must be a string, got int"):
        read(path, "sft")


def test_row_that_is_not_an_object(write_jsonl):
    path = write_jsonl("s.jsonl", ['{"prompt": "Q"}', '["Q", "A"]'])
    with pytest.raises(DataError, match=f"{path}:2: expected a JSON object, got list"):
        read(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"], ids=["empty", "blank", "array"])
def test_empty_file(write_text, content):
    path = write_text("empty.json", content)
    with pytest.raises(DataError, match=f"{path}: file is empty"):
        read(path)


@pytest.mark.parametrize(
    ("responses", "message"),
    [(["only"], "at least 2"), ("best", "list of strings"), (["a", 2], "list of strings")],
)
def test_bad_ranking(write_jsonl, responses, message):
    path = write_jsonl("r.jsonl", [{"prompt": "Q", "responses": responses}])
    with pytest.raises(DataError, match=f"{path}:1: .*{message}"):
        read(path, "ranking")


def test_undetectable_format_names_row(write_jsonl):
    path = write_jsonl("x.jsonl", [{"question": "Q"}])
    with pytest.raises(DataError, match=f"{path}:1: cannot detect the format"):
        read(path)


def test_nemo_odd_line_count_names_unpaired_line(write_jsonl):
    path = write_jsonl("c.jsonl", [{"text": "a=1"}, {"text": "a=2"}, {"text": "b=3"}])
    with pytest.raises(DataError, match=f"{path}:3: odd number of comparison lines"):
        read(path, "nemo_comparison", prompt_response_separator="=")


def test_nemo_missing_separator_names_line(write_jsonl):
    path = write_jsonl("c.jsonl", [{"text": "a=1"}, {"text": "a 2"}])
    with pytest.raises(DataError, match=f"{path}:2: prompt/response separator '=' not found"):
        read(path, "nemo_comparison", prompt_response_separator="=")


def test_nemo_prompts_differ(write_jsonl):
    path = write_jsonl("c.jsonl", [{"text": "a=1"}, {"text": "b=2"}])
    with pytest.raises(DataError, match=f"{path}:2: prompt differs .* {path}:1"):
        read(path, "nemo_comparison", prompt_response_separator="=")


def test_nemo_missing_text_field(write_jsonl):
    path = write_jsonl("c.jsonl", [{"content": "a=1"}, {"text": "a=2"}])
    with pytest.raises(DataError, match=f"{path}:1: missing field 'text'"):
        read(path, "nemo_comparison", prompt_response_separator="=")


def test_missing_local_file_is_reported_with_its_name(tmp_path):
    path = str(tmp_path / "nope" / "missing.jsonl")
    with pytest.raises(DataError, match=f"{path}: no such file or directory"):
        read(path)
