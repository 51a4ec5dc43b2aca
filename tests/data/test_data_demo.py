"""The committed addition demo: reproducible, tokenizable, well split, and its metric."""

import filecmp
import json
import re

import numpy as np
import pytest
import yaml
from data_helpers import DEMO_DIR

from shared.data import (
    STEPS,
    DataConfig,
    DatasetSpec,
    PairwiseBatch,
    PromptBatch,
    SFTBatch,
    build_ptx_data,
    build_step_data,
    demo,
    read_dataset,
)

DATA_FILES = [
    "sft.jsonl",
    "reward.jsonl",
    "nemo_comparisons.jsonl",
    "prompts.jsonl",
    "eval.jsonl",
    "ptx.txt",
    "README.md",
]
TOKENIZER_FILES = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]


def rows(name):
    return [json.loads(line) for line in (DEMO_DIR / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_DIR / "tokenizer"))


def test_regenerating_gives_byte_identical_files(tmp_path):
    demo.main(["--out", str(tmp_path / "a")])
    demo.write(str(tmp_path / "b"))
    for name in DATA_FILES + TOKENIZER_FILES:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
        assert filecmp.cmp(tmp_path / "a" / name, DEMO_DIR / name, shallow=False), (
            f"configs/demo/{name} is stale: run python -m shared.data.demo --out configs/demo"
        )


def test_demo_is_small():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 300_000


def test_tokenizer_round_trips_every_prompt_and_response(demo_tokenizer):
    texts = {r["prompt"] for r in rows("sft.jsonl")} | {r["response"] for r in rows("sft.jsonl")}
    texts |= {r["rejected"] for r in rows("reward.jsonl")}
    texts |= set((DEMO_DIR / "ptx.txt").read_text().splitlines())
    unk = demo_tokenizer.unk_token_id
    for text in sorted(texts):
        ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and unk not in ids, text
        assert demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.pad_token == "<pad>" and demo_tokenizer.eos_token == "</s>"
    assert (
        demo_tokenizer("12+7=")["input_ids"]
        == demo_tokenizer("12+7=", add_special_tokens=False)["input_ids"]
    )  # no BOS: prompts are exactly their characters


def test_splits_and_labels():
    sft, reward, eval_rows = rows("sft.jsonl"), rows("reward.jsonl"), rows("eval.jsonl")
    ppo = {r["prompt"] for r in rows("prompts.jsonl")}
    held_out = {r["prompt"] for r in eval_rows}
    ptx_prompts = {
        line.split("=")[0] + "=" for line in (DEMO_DIR / "ptx.txt").read_text().splitlines()
    }
    assert len(held_out) == demo.NUM_EVAL_PAIRS and len(ppo) == 400 - demo.NUM_EVAL_PAIRS
    assert held_out.isdisjoint(ppo)
    assert held_out.isdisjoint(r["prompt"] for r in reward)
    assert held_out.isdisjoint(ptx_prompts)
    assert held_out <= {r["prompt"] for r in sft}  # operands do appear in the noisy SFT data
    for r in eval_rows:
        assert r["answer"] == str(demo.expected_answer(r["prompt"]))
    prompts = [r["prompt"] for r in reward]
    assert demo.arithmetic_correct(prompts, [r["chosen"] for r in reward]).all()
    assert not demo.arithmetic_correct(prompts, [r["rejected"] for r in reward]).any()
    accuracy = demo.arithmetic_accuracy([r["prompt"] for r in sft], [r["response"] for r in sft])
    assert 0.4 < accuracy < 0.6  # the demonstrator is noisy


def test_sft_mode_is_wrong_on_carry_sums():
    """Greedy imitation of the demonstrator fails the carries: room for RLHF under greedy too."""
    answers = {}
    for r in rows("sft.jsonl"):
        answers.setdefault(r["prompt"], []).append(r["response"])
    carry_right = []
    for prompt, responses in answers.items():
        a, b = map(int, prompt[:-1].split("+"))
        if a % 10 + b % 10 >= 10:
            carry_right.extend(demo.arithmetic_correct([prompt] * len(responses), responses))
    assert np.mean(carry_right) < 0.4


def test_nemo_comparisons_read_as_the_same_pairs():
    nemo, _ = read_dataset(
        DatasetSpec(str(DEMO_DIR / "nemo_comparisons.jsonl"), format="nemo_comparison"),
        DataConfig(prompt_response_separator="="),
    )
    pairs, _ = read_dataset(DatasetSpec(str(DEMO_DIR / "reward.jsonl")))
    assert nemo == pairs


def test_readme_data_section_builds_every_step(demo_tokenizer):
    readme = (DEMO_DIR / "README.md").read_text()
    section = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    raw = yaml.safe_load(section.replace("./demo/", f"{DEMO_DIR}/"))["data"]
    config = DataConfig.from_dict(raw)
    expected = {"sft": SFTBatch, "reward": PairwiseBatch, "ppo": PromptBatch}
    for step in STEPS:
        data = build_step_data(config, demo_tokenizer, step)
        assert isinstance(data.train, expected[step]) and data.eval is not None
        assert not any(k.endswith("_truncated") and v for k, v in data.report.counts.items())
    ppo = build_step_data(config, demo_tokenizer, "ppo")
    assert len(ppo.train) == 320 and len(ppo.eval) == 80 and ppo.eval.reference is not None
    ptx = build_ptx_data(config, demo_tokenizer)
    assert ptx.train.input_ids.shape[1] == demo.MAX_PROMPT_SEQ_LEN + demo.MAX_ANSWER_SEQ_LEN


@pytest.mark.parametrize(
    ("completion", "correct"),
    [
        ("19", True),
        ("19 ", False),
        (" 19", False),
        ("019", False),
        ("1", False),
        ("19+1", False),
        ("", False),
    ],
)
def test_arithmetic_accuracy_is_strict(completion, correct):
    assert demo.arithmetic_accuracy(["12+7="], [completion]) == float(correct)


def test_arithmetic_accuracy_errors():
    assert demo.arithmetic_accuracy(["1+1=", "2+2="], ["2", "5"]) == 0.5
    with pytest.raises(ValueError, match="not an addition prompt"):
        demo.arithmetic_accuracy(["hello"], ["2"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        demo.arithmetic_accuracy(["1+1=", "2+2="], ["2"])
    with pytest.raises(ValueError, match="at least one"):
        demo.arithmetic_accuracy([], [])
