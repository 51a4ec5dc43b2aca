"""The embedded demo: two-operand addition, where RLHF must beat SFT on a metric it never sees.

    python -m shared.data.demo --out configs/demo

writes, deterministically (numpy's RandomState streams are frozen across versions):

- `tokenizer/`: a character-level tokenizer (digits, '+', '=', ' ', and <pad> <s> </s> <unk>),
  loadable with `AutoTokenizer.from_pretrained`
- `sft.jsonl` {"prompt": "12+7=", "response": "19"}: a NOISY demonstrator, right about half the
  time. On sums whose units digits carry it forgets the carry (answer - 10) half the time, and
  is right only 30% of the time, so an SFT model's most likely answer to a carry sum is wrong;
  otherwise it is right 65% of the time and off by 1 or 10 the rest.
- `reward.jsonl` {"prompt", "chosen", "rejected"}: reliable comparisons, the correct sum against
  plausible wrong ones (forgotten carry, off by 1 or 10)
- `prompts.jsonl` {"prompt"}: the PPO prompts
- `nemo_comparisons.jsonl`: the same comparisons in NeMo-RLHF's {"text"} line-pair layout
- `eval.jsonl` {"prompt", "answer"}: held-out prompts, disjoint from the PPO prompts, the
  comparisons and `ptx.txt` (their operands do appear in the noisy SFT data)
- `ptx.txt`: correct equations "12+7=19", one per line, for the ptx loss
- `README.md`: how they were made, their sizes, and the `data:` config section reading them

Operands are 0..19 (400 ordered pairs, sums up to 38, answers of one or two digits): small
enough that a ~100k-parameter transformer trained from scratch for a minute or two on two CPU
cores learns the SFT distribution, and RLHF can then fix the carries, which shows up in
`arithmetic_accuracy` on the held-out prompts, a metric the reward model never sees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence

import numpy as np

OPERAND_MAX = 19
"""Operands are 0..OPERAND_MAX inclusive."""

SEED = 20240521
NUM_EVAL_PAIRS = 80
"""Operand pairs held out for evaluation (of 400)."""
DEMOS_PER_PAIR = 4
"""Noisy SFT demonstrations drawn for every operand pair."""
COMPARISONS_PER_PAIR = 3
"""Comparisons (correct vs a distinct wrong answer) for every non-eval operand pair."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = "0123456789+= "
"""The tokenizer's characters: one token each."""

MAX_PROMPT_SEQ_LEN = 6  # "19+19="
MAX_ANSWER_SEQ_LEN = 4  # "38" + "</s>" with one token to spare
MAX_SEQ_LEN = MAX_PROMPT_SEQ_LEN + MAX_ANSWER_SEQ_LEN

_PROMPT = re.compile(r"(\d+)\+(\d+)=")


def prompt_for(a: int, b: int) -> str:
    return f"{a}+{b}="


def expected_answer(prompt: str) -> int:
    """The sum asked for by a prompt like "12+7="."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(match.group(1)) + int(match.group(2))


def arithmetic_correct(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """[N] bool: completion i is exactly the digits of the sum asked by prompt i.

    Strict: the completion must be the answer's digits and then end; a completion is the
    decoded generated text up to the first eos, special tokens removed. "19" is right for
    "12+7="; "19 ", " 19", "019" and "19+1" are not.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pairs = zip(prompts, completions, strict=True)
    return np.array([c == str(expected_answer(p)) for p, c in pairs], dtype=bool)


def arithmetic_accuracy(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of completions that are exactly the right sum (see `arithmetic_correct`)."""
    if len(prompts) == 0:
        raise ValueError("arithmetic_accuracy needs at least one prompt")
    return float(arithmetic_correct(prompts, completions).mean())


def arithmetic_reward(prompt: str, answer: str) -> float:
    """A rule-based reward (``ppo.reward_function: shared.data.demo:arithmetic_reward``): 1.0
    when ``answer`` is exactly the sum asked by ``prompt`` (`arithmetic_correct`'s rule, the
    held-out metric's), else 0.0. A prompt that is not ``a+b=`` raises ValueError."""
    return float(answer == str(expected_answer(prompt)))


def _carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def _off_by(total: int, delta: int, rng: np.random.RandomState) -> int:
    """total +- delta (sign drawn), staying non-negative."""
    sign = 1 if rng.randint(2) else -1
    return total + sign * delta if total + sign * delta >= 0 else total + delta


def _demonstrate(a: int, b: int, rng: np.random.RandomState) -> int:
    """The noisy demonstrator's answer to a + b."""
    total = a + b
    u = rng.random_sample()
    if _carries(a, b):
        if u < 0.3:
            return total
        if u < 0.8:
            return total - 10  # the forgotten carry
        return _off_by(total, 1, rng)
    if u < 0.65:
        return total
    if u < 0.9:
        return _off_by(total, 1, rng)
    return _off_by(total, 10, rng)


def _wrong_answers(a: int, b: int, k: int, rng: np.random.RandomState) -> list[int]:
    """k distinct plausible wrong answers; a forgotten carry comes first when there is one."""
    total = a + b
    candidates = [w for w in (total - 1, total + 1, total - 10, total + 10) if w >= 0]
    forgotten = [total - 10] if _carries(a, b) else []
    others = [w for w in candidates if w not in forgotten]
    picked = forgotten + [others[i] for i in rng.permutation(len(others))]
    return picked[:k]


def build_tokenizer():
    """The character-level tokenizer as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=64,
    )


def generate(seed: int = SEED) -> dict[str, list]:
    """The demo's rows, keyed by file name (lists of dicts for .jsonl, of strings for .txt)."""
    rng = np.random.RandomState(seed)
    pairs = [(a, b) for a in range(OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)]
    order = rng.permutation(len(pairs))
    eval_pairs = sorted(pairs[i] for i in order[:NUM_EVAL_PAIRS])
    train_pairs = sorted(pairs[i] for i in order[NUM_EVAL_PAIRS:])

    sft = [
        {"prompt": prompt_for(a, b), "response": str(_demonstrate(a, b, rng))}
        for a, b in pairs
        for _ in range(DEMOS_PER_PAIR)
    ]
    reward = [
        {"prompt": prompt_for(a, b), "chosen": str(a + b), "rejected": str(wrong)}
        for a, b in train_pairs
        for wrong in _wrong_answers(a, b, COMPARISONS_PER_PAIR, rng)
    ]
    reward = [reward[i] for i in rng.permutation(len(reward))]
    return {
        "sft.jsonl": [sft[i] for i in rng.permutation(len(sft))],
        "reward.jsonl": reward,
        # the same comparisons in NeMo-RLHF's layout: prompt+good line, then prompt+bad line
        "nemo_comparisons.jsonl": [
            {"text": r["prompt"] + response}
            for r in reward
            for response in (r["chosen"], r["rejected"])
        ],
        "prompts.jsonl": [
            {"prompt": prompt_for(*train_pairs[i])} for i in rng.permutation(len(train_pairs))
        ],
        "eval.jsonl": [{"prompt": prompt_for(a, b), "answer": str(a + b)} for a, b in eval_pairs],
        "ptx.txt": [
            f"{a}+{b}={a + b}"
            for a, b in (train_pairs[i] for i in rng.permutation(len(train_pairs)))
        ],
    }


DATA_SECTION = f"""\
data:
  datasets:
    - {{path: ./demo/sft.jsonl, format: sft, steps: [sft]}}
    - {{path: ./demo/reward.jsonl, format: pairwise, steps: [reward]}}
    - {{path: ./demo/prompts.jsonl, format: prompt, steps: [ppo]}}
    - {{path: ./demo/eval.jsonl, format: prompt, steps: [ppo], eval_only: true}}
  data_split: "1,1,1"
  eval_fraction: 0.1
  unsupervised_dataset_name: ./demo/ptx.txt
  max_seq_len: {MAX_SEQ_LEN}
  max_prompt_seq_len: {MAX_PROMPT_SEQ_LEN}
  max_answer_seq_len: {MAX_ANSWER_SEQ_LEN}
"""
"""The `data:` section for a config file in configs/ (paths are relative to it); each dataset
feeds one step, so `data_split` only has to give every step a positive share."""


def _readme(rows: dict[str, list]) -> str:
    sft = rows["sft.jsonl"]
    right = arithmetic_accuracy([r["prompt"] for r in sft], [r["response"] for r in sft])
    carry = [r for r in sft if _carries(*map(int, r["prompt"][:-1].split("+")))]
    carry_right = arithmetic_accuracy([r["prompt"] for r in carry], [r["response"] for r in carry])
    sizes = "\n".join(f"| `{name}` | {len(rows[name])} |" for name in rows)
    n_pairs = (OPERAND_MAX + 1) ** 2
    return f"""\
# Embedded demo: two-operand addition

Generated by `python -m shared.data.demo --out configs/demo` (seed {SEED}); rerunning it gives
byte-identical files (`tests/data/test_data_demo.py` checks). Do not edit by hand.

Prompts are `a+b=` with a, b in 0..{OPERAND_MAX} ({n_pairs} ordered pairs); a response is the
sum's digits, and the tokenisation layer appends `</s>`. The operand range is small enough for a
~100k-parameter transformer trained from scratch for a minute or two on two CPU cores.

| file | rows |
|---|---|
{sizes}

- `sft.jsonl` (`prompt`, `response`): {DEMOS_PER_PAIR} demonstrations for each of the {n_pairs}
  pairs from a noisy demonstrator, right on {right:.1%} of them. When the units digits carry it
  forgets the carry half the time (answer - 10) and is right on only {carry_right:.1%}, so an SFT
  model's most likely answer to a carry sum is wrong; otherwise it is right 65% of the time and
  off by 1 or 10 the rest.
- `reward.jsonl` (`prompt`, `chosen`, `rejected`): up to {COMPARISONS_PER_PAIR} reliable
  comparisons for each of the {len(rows["prompts.jsonl"])} non-eval pairs: the correct sum
  against a distinct plausible wrong one (forgotten carry, off by 1 or 10).
- `nemo_comparisons.jsonl`: the same comparisons in NeMo-RLHF's layout (`{{"text": prompt +
  good}}` then `{{"text": prompt + bad}}`; read with `prompt_response_separator: "="`).
- `prompts.jsonl` (`prompt`): the {len(rows["prompts.jsonl"])} non-eval prompts, for PPO.
- `eval.jsonl` (`prompt`, `answer`): {NUM_EVAL_PAIRS} held-out prompts with the correct answer;
  disjoint from the PPO prompts, the comparisons and `ptx.txt` (their operands do appear in the
  noisy SFT data).
- `ptx.txt`: the correct equations of the non-eval pairs, one per line, for the ptx loss.
- `tokenizer/`: character-level, one token per character of `{CHARACTERS}` plus
  `{" ".join(SPECIAL_TOKENS)}`; `AutoTokenizer.from_pretrained("configs/demo/tokenizer")`.

The held-out metric is `shared.data.demo.arithmetic_accuracy(prompts, completions)`: the
fraction of completions (decoded up to the first `</s>`) that are exactly the sum's digits; the
reward model never sees it. A policy imitating the demonstrator scores about 50% sampling and
about 55% greedily (the carry sums go wrong): RLHF has the rest to gain.

The `data:` section for a config file in `configs/` (checked by the tests):

```yaml
{DATA_SECTION}```
"""


def write(out: str, seed: int = SEED) -> None:
    """Writes every demo file under `out` (see the module docstring)."""
    os.makedirs(out, exist_ok=True)
    rows = generate(seed)
    for name, items in rows.items():
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as f:
            for item in items:
                f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(_readme(rows))
    tokenizer_dir = os.path.join(out, "tokenizer")
    build_tokenizer().save_pretrained(tokenizer_dir)
    # Name the class every transformers version knows (5.x writes its own backend's name).
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/demo", help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help="generation seed")
    args = parser.parse_args(argv)
    write(args.out, args.seed)
    print(f"wrote the addition demo to {args.out}")


if __name__ == "__main__":
    main()
