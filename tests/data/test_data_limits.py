"""Inputs bounded before they reach a model: line size and encoding of local files, and the
shares of truncated, dropped and `<unk>` data (with their limits), and train/eval overlap."""

from __future__ import annotations

import logging
import tracemalloc

import pytest
from data_helpers import make_char_tokenizer

from shared.data import DataConfig, DataError, DatasetSpec, build_ptx_data, build_step_data
from shared.data.quality import data_quality
from shared.data.readers import read_lines
from shared.data.tokenize import unknown_token_id


def _sft(path: str, **config) -> DataConfig:
    return DataConfig(datasets=(DatasetSpec(path, format="sft"),), data_split="1,0,0",
                      eval_fraction=0.0, **config)


def _rows(n: int, prompt: str = "q{i}?", response: str = " a{i}") -> list[dict[str, str]]:
    return [{"prompt": prompt.format(i=i), "response": response.format(i=i)} for i in range(n)]


# -- line size and encoding -------------------------------------------------------------------


def test_a_line_over_max_line_bytes_names_file_line_and_key(write_jsonl, tokenizer):
    path = write_jsonl("big.jsonl", _rows(2) + [{"prompt": "x" * 5000, "response": " y"}])
    with pytest.raises(DataError) as err:
        build_step_data(_sft(path, max_line_bytes=1000), tokenizer, "sft")
    assert f"{path}:3: line longer than data.max_line_bytes = 1000 bytes" in str(err.value)


def test_line_limit_is_exact(write_text):
    path = write_text("edge.txt", "a" * 10 + "\n" + "b" * 10 + "\r\n" + "c" * 10)
    assert [line for _, line in read_lines(path, 10)] == ["a" * 10, "b" * 10, "c" * 10]
    with pytest.raises(DataError, match=r"edge.txt:1: line longer"):
        list(read_lines(path, 9))


def test_a_long_line_is_never_read_whole(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_bytes(b"x" * 20_000_000)  # one 20 MB line
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="huge.txt:1: line longer"):
            list(read_lines(str(path), 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, tokenizer, suffix):
    path = tmp_path / f"latin1{suffix}"
    good = b"hello" if suffix == ".txt" else b'{"prompt": "q?", "response": " ok"}'
    bad = b"caf\xe9" if suffix == ".txt" else b'{"prompt": "caf\xe9?", "response": " no"}'
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(DataError) as err:
        spec = DatasetSpec(str(path), format="text" if suffix == ".txt" else "sft")
        from shared.data import read_dataset

        read_dataset(spec)
    column = 4 if suffix == ".txt" else 16
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at column {column}" in str(err.value)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "q?", "response": " a"}\r\n'
                     b'{"prompt": "r?", "response": " b"}\r\n')
    data = build_step_data(_sft(str(path)), tokenizer, "sft")
    assert len(data.train) == 2


def test_json_array_files_are_still_read_item_by_item(write_text, tokenizer):
    path = write_text("rows.json", '\n[\n {"prompt": "q?", "response": " a"},\n'
                                   ' {"prompt": "r?", "response": " b"}\n]\n')
    assert len(build_step_data(_sft(path), tokenizer, "sft").train) == 2


# -- shares truncated, dropped and unknown -----------------------------------------------------


def test_truncated_share_is_reported_and_limited(write_jsonl, tokenizer):
    path = write_jsonl("sft.jsonl", _rows(3, response=" a long answer {i}") + _rows(1))
    data = build_step_data(_sft(path, max_seq_len=12, max_truncated_fraction=1.0),
                           tokenizer, "sft")
    assert data.quality["truncated_fraction"] == pytest.approx(3 / 4)
    assert data.report.get("sft/truncated_rows") == 3 and data.report.get("sft/rows") == 4
    assert "sft: 75.0% of 4 rows truncated" in data.report.summary()
    with pytest.raises(DataError) as err:
        build_step_data(_sft(path, max_seq_len=12), tokenizer, "sft")
    message = str(err.value)
    assert "75.0% of the rows truncated, above data.max_truncated_fraction = 0.5" in message
    assert "data.max_seq_len" in message


def test_a_pair_is_truncated_once_whichever_side_is_cut(write_jsonl, tokenizer):
    rows = [{"prompt": "q?", "chosen": " a very long chosen answer", "rejected": " no"},
            {"prompt": "r?", "chosen": " yes", "rejected": " no"}]
    path = write_jsonl("pairs.jsonl", rows)
    config = DataConfig(datasets=(DatasetSpec(path),), data_split="0,1,0", eval_fraction=0.0,
                        max_seq_len=10)
    data = build_step_data(config, tokenizer, "reward")
    assert data.quality["truncated_fraction"] == 0.5
    assert data.report.get("reward/response_truncated") == 1


def test_dropped_share_is_reported_and_limited(write_jsonl, tokenizer):
    rows = _rows(2) + [{"prompt": "q?", "response": "  "}] * 3 + [""]  # 3 empty, a blank line
    path = write_jsonl("sft.jsonl", rows)
    data = build_step_data(_sft(path, max_dropped_fraction=0.6), tokenizer, "sft")
    assert data.quality["dropped_fraction"] == pytest.approx(3 / 5)  # blank lines are not rows
    with pytest.raises(DataError, match=r"60.0% of the rows dropped, above "
                                        r"data.max_dropped_fraction = 0.5"):
        build_step_data(_sft(path), tokenizer, "sft")


def test_empty_prompts_count_as_dropped(write_jsonl, tokenizer):
    path = write_jsonl("p.jsonl", [{"prompt": "q?"}, {"prompt": ""}, {"prompt": ""},
                                   {"prompt": "r?"}])
    config = DataConfig(datasets=(DatasetSpec(path, format="prompt"),), data_split="0,0,1",
                        eval_fraction=0.0, max_dropped_fraction=1.0)
    assert build_step_data(config, tokenizer, "ppo").quality["dropped_fraction"] == 0.5


def test_unknown_token_share_is_reported_and_limited(write_jsonl, tokenizer):
    path = write_jsonl("sft.jsonl", _rows(4, prompt="é{i}?"))  # é is outside the vocabulary
    data = build_step_data(_sft(path, max_unk_fraction=1.0), tokenizer, "sft")
    texts = sum(len(f"é{i}?") + len(f" a{i}") for i in range(4))
    assert data.report.get("sft/unk_tokens") == 4 and data.report.get("sft/text_tokens") == texts
    assert data.quality["unk_fraction"] == pytest.approx(4 / texts)
    with pytest.raises(DataError, match=r"of the text tokens unknown \(<unk>\), above "
                                        r"data.max_unk_fraction = 0.05"):
        build_step_data(_sft(path), tokenizer, "sft")


def test_an_unknown_token_that_is_also_eos_is_not_counted():
    tokenizer = make_char_tokenizer()
    assert unknown_token_id(tokenizer) == tokenizer.unk_token_id
    tokenizer.unk_token = tokenizer.eos_token  # GPT-2: <|endoftext|> is unk, bos and eos
    assert unknown_token_id(tokenizer) is None


def test_ptx_unknown_tokens_are_limited(write_text, tokenizer):
    path = write_text("ptx.txt", "ééé\nabc\n")
    config = DataConfig(unsupervised_dataset_name=path, max_unk_fraction=0.1)
    with pytest.raises(DataError, match="ptx: 50.0% of the text tokens unknown"):
        build_ptx_data(config, tokenizer)


def test_limits_apply_to_a_cached_step_too(write_jsonl, tokenizer, tmp_path):
    path = write_jsonl("sft.jsonl", _rows(3, response=" a long answer {i}") + _rows(1))
    cache = str(tmp_path / "cache")
    first = build_step_data(_sft(path, max_seq_len=12, max_truncated_fraction=1.0,
                                 cache_dir=cache), tokenizer, "sft")
    assert not first.report.cache_hit
    with pytest.raises(DataError, match="max_truncated_fraction"):
        build_step_data(_sft(path, max_seq_len=12, cache_dir=cache), tokenizer, "sft")
    again = build_step_data(_sft(path, max_seq_len=12, max_truncated_fraction=0.9,
                                 cache_dir=cache), tokenizer, "sft")
    assert again.report.cache_hit and again.quality == first.quality


# -- train/eval overlap ------------------------------------------------------------------------


def test_eval_rows_identical_to_train_rows_are_counted_and_warned(write_jsonl, tokenizer,
                                                                  caplog):
    path = write_jsonl("sft.jsonl", _rows(4) * 5)  # every row five times
    config = DataConfig(datasets=(DatasetSpec(path, format="sft"),), data_split="1,0,0",
                        eval_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="shared.data"):
        data = build_step_data(config, tokenizer, "sft")
    assert data.quality["eval_overlap"] == len(data.eval) == 4
    assert "4 of 4 eval rows are identical to training rows" in caplog.text


def test_ppo_overlap_compares_prompts_only(write_jsonl, tokenizer):
    train = write_jsonl("train.jsonl", [{"prompt": f"q{i}?", "answer": "1"} for i in range(4)])
    evals = write_jsonl("eval.jsonl", [{"prompt": "q0?", "answer": "2"},
                                       {"prompt": "new?", "answer": "1"}])
    config = DataConfig(datasets=(DatasetSpec(train, format="prompt"),
                                  DatasetSpec(evals, format="prompt", eval_only=True)),
                        data_split="0,0,1")
    assert build_step_data(config, tokenizer, "ppo").quality["eval_overlap"] == 1


def test_demo_data_is_within_every_limit(tokenizer):
    from data_helpers import DEMO_DIR
    from transformers import AutoTokenizer

    demo = AutoTokenizer.from_pretrained(DEMO_DIR / "tokenizer")
    config = DataConfig(datasets=(DatasetSpec(str(DEMO_DIR / "sft.jsonl"), format="sft"),),
                        data_split="1,0,0", max_seq_len=10, max_prompt_seq_len=6)
    quality = build_step_data(config, demo, "sft").quality
    assert quality["truncated_fraction"] == quality["dropped_fraction"] == 0.0
    assert quality["unk_fraction"] == 0.0
    assert data_quality(build_step_data(config, demo, "sft").report, "sft") == quality
