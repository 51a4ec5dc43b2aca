"""The on-disk cache, ptx sources and the logged report."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import REPO_ROOT, make_char_tokenizer, pairwise_rows

from shared.data import DataConfig, DatasetSpec, build_ptx_data, build_step_data, pipeline


def assert_same_batches(a, b):
    assert type(a) is type(b)
    arrays_a, arrays_b = a.arrays(), b.arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name])
        assert arrays_a[name].dtype == arrays_b[name].dtype


@pytest.mark.parametrize("step", ["sft", "reward", "ppo"])
def test_second_load_hits_the_cache(write_jsonl, tmp_path, tokenizer, monkeypatch, step):
    path = write_jsonl("p.jsonl", pairwise_rows(30))
    config = DataConfig(
        datasets=(DatasetSpec(path),),
        cache_dir=str(tmp_path / "cache"),
        max_seq_len=16,
        eval_fraction=0.1,
    )
    first = build_step_data(config, tokenizer, step)
    assert not first.report.cache_hit and os.path.exists(first.report.cache_path)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    monkeypatch.setattr(pipeline, "_select", no_tokenising)
    monkeypatch.setattr(pipeline, "_encode", no_tokenising)
    second = build_step_data(config, tokenizer, step)
    assert second.report.cache_hit and second.report.cache_path == first.report.cache_path
    assert_same_batches(first.train, second.train)
    assert_same_batches(first.eval, second.eval)
    assert second.report.counts == first.report.counts


def test_cache_misses_when_content_tokenizer_or_config_change(write_jsonl, tmp_path, tokenizer):
    path = write_jsonl("p.jsonl", pairwise_rows(10))
    config = DataConfig(
        datasets=(DatasetSpec(path),), cache_dir=str(tmp_path / "c"), eval_fraction=0
    )
    paths = {build_step_data(config, tokenizer, "reward").report.cache_path}
    write_jsonl("p.jsonl", pairwise_rows(11))  # same file name, new content
    paths.add(build_step_data(config, tokenizer, "reward").report.cache_path)
    paths.add(build_step_data(config, make_char_tokenizer(bos=True), "reward").report.cache_path)
    config = DataConfig(
        datasets=(DatasetSpec(path),),
        cache_dir=str(tmp_path / "c"),
        eval_fraction=0,
        max_seq_len=64,
    )
    data = build_step_data(config, tokenizer, "reward")
    paths.add(data.report.cache_path)
    assert len(paths) == 4 and not data.report.cache_hit


def test_ptx_from_text_jsonl_and_hf_dir(write_text, write_jsonl, tmp_path, tokenizer):
    docs = ["one two", "three"]
    sources = {
        "txt": write_text("ptx.txt", "\n".join(docs) + "\n"),
        "jsonl": write_jsonl("ptx.jsonl", [{"text": d} for d in docs]),
        # no `text` column: the first column is the text, as in DeepSpeed-Chat
        "dir": os.path.dirname(write_jsonl("wiki/train.jsonl", [{"content": d} for d in docs])),
    }
    outputs = []
    for name, source in sources.items():
        config = DataConfig(
            unsupervised_dataset_name=source,
            max_prompt_seq_len=3,
            max_answer_seq_len=2,
            cache_dir=str(tmp_path / f"cache_{name}"),
        )
        data = build_ptx_data(config, tokenizer)
        assert data.train.input_ids.shape == (3, 5)  # 8 + 6 tokens with eos -> 3 blocks of 5
        assert data.report.get("ptx/documents") == 2
        outputs.append(data.train.input_ids)
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)
    assert build_ptx_data(DataConfig(), tokenizer) is None


def test_ptx_second_load_hits_the_cache(write_text, tmp_path, tokenizer):
    config = DataConfig(
        unsupervised_dataset_name=write_text("ptx.txt", "1+1=2\n"), cache_dir=str(tmp_path)
    )
    assert not build_ptx_data(config, tokenizer).report.cache_hit
    assert build_ptx_data(config, tokenizer).report.cache_hit


def test_report_is_logged(write_jsonl, tokenizer, caplog):
    path = write_jsonl("q.jsonl", [{"prompt": "x" * 9}, {"prompt": None}, {"prompt": "y"}])
    config = DataConfig(datasets=(DatasetSpec(path),), eval_fraction=0, max_prompt_seq_len=4)
    with caplog.at_level(logging.INFO, logger="shared.data"):
        build_step_data(config, tokenizer, "ppo")
    assert "ppo/prompt_truncated: 1" in caplog.text
    assert f"{path}/skipped/null_field: 1" in caplog.text
    assert "ppo/train_examples: 2" in caplog.text


_NO_TORCH_OR_JAX = """
import sys
for name in ("torch", "jax", "jax.numpy", "flax", "optax"):
    sys.modules[name] = None  # any import of these now raises ImportError
import shared.data as data
assert "transformers" not in sys.modules and "datasets" not in sys.modules  # config stays light
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("configs/demo/tokenizer")
spec = data.DatasetSpec("configs/demo/reward.jsonl", steps=("reward",))
config = data.DataConfig(datasets=(spec,), eval_fraction=0, max_seq_len=10)
print(len(data.build_step_data(config, tokenizer, "reward").train))
"""


def test_data_layer_runs_without_torch_or_jax():
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_OR_JAX],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "959"


@pytest.mark.parametrize("sub", ["", "data"], ids=["flat", "data subdir"])
def test_dschat_local_jsonfile_reads_train_and_eval(tmp_path, tokenizer, sub):
    """DeepSpeed-Chat's `local/jsonfile`: a directory with train.json and eval.json (JSON
    arrays), eval.json the held-out set of every step, whole (today's data_split shares the
    train rows only)."""
    import json

    folder = tmp_path / "jsonfile"
    (folder / sub).mkdir(parents=True)
    (folder / sub / "train.json").write_text(json.dumps(pairwise_rows(30)))
    (folder / sub / "eval.json").write_text(json.dumps(pairwise_rows(7, prefix="e")))
    config = DataConfig(datasets=(DatasetSpec(str(folder)),), max_seq_len=16,
                        eval_fraction=0.1)
    for step in ("sft", "reward", "ppo"):
        data = build_step_data(config, tokenizer, step)
        assert len(data.eval) == 7, step
        assert data.report.counts[f"{folder / sub / 'eval.json'}/{step}/eval"] == 7
    assert sum(len(build_step_data(config, tokenizer, s).train)
               for s in ("sft", "reward", "ppo")) == 30
    assert pipeline.expand_local_jsonfile(DatasetSpec(str(tmp_path))) == [
        DatasetSpec(str(tmp_path))]  # any other directory goes through `datasets`


def test_dschat_local_jsonfile_name_means_data_under_the_working_directory(
        tmp_path, tokenizer, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(pipeline.DataError, match="local/jsonfile.*data/train.json"):
        pipeline.expand_local_jsonfile(DatasetSpec("local/jsonfile"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(pairwise_rows(4)))
    (tmp_path / "data" / "eval.json").write_text(json.dumps(pairwise_rows(2, prefix="e")))
    specs = pipeline.expand_local_jsonfile(DatasetSpec("local/jsonfile", steps=("reward",)))
    assert [(s.path, s.eval_only, s.steps) for s in specs] == [
        (str(tmp_path / "data" / "train.json"), False, ("reward",)),
        (str(tmp_path / "data" / "eval.json"), True, ("reward",))]
