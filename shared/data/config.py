"""Configuration of the data layer: which datasets feed which RLHF step, and how they are cut.

`DataConfig` is embedded by the top-level config as its `data:` section. Both dataclasses are
frozen; `__post_init__` validates every field and names the field, the value and what is allowed.
`from_dict` builds them from the plain dicts and lists that YAML produces.

Split semantics follow DeepSpeed-Chat (`--data_split 2,4,4`): each dataset is permuted once with
`shuffle_seed` and cut into disjoint, contiguous shares for SFT, reward-model training and PPO, so
no example trains two steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

STEPS: tuple[str, ...] = ("sft", "reward", "ppo")
"""The three RLHF steps, in the order `data_split` lists their shares."""

FORMATS: tuple[str, ...] = (
    "auto",
    "pairwise",
    "nemo_comparison",
    "ranking",
    "prompt",
    "sft",
    "text",
)
"""Record formats a dataset can be read as; see `shared.data.readers` for each layout."""


def _fail(owner: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{field}: got {value!r}; {allowed}")


def parse_data_split(data_split: str) -> tuple[float, float, float]:
    """Parses `"2,4,4"` into normalised shares `(0.2, 0.4, 0.4)` for (sft, reward, ppo)."""
    parts = [p.strip() for p in str(data_split).split(",")]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if (len(shares) != 3 or not all(math.isfinite(s) and s >= 0 for s in shares)
            or sum(shares) <= 0):
        _fail(
            "DataConfig",
            "data_split",
            data_split,
            "expected three comma-separated finite non-negative numbers with a positive sum, "
            "the relative shares of sft,reward,ppo (e.g. '2,4,4' or '10,0,0')",
        )
    total = sum(shares)
    return (shares[0] / total, shares[1] / total, shares[2] / total)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where it lives, how to read it and which steps it feeds."""

    path: str
    """Hugging Face hub name (e.g. `Dahoas/rm-static`), or a local file (.json, .jsonl, .txt,
    .csv, .parquet) or directory (loaded with `datasets.load_dataset` / `load_from_disk`). A
    directory in DeepSpeed-Chat's `local/jsonfile` layout (`train.json` and `eval.json`, at its
    top or under `data/`) is read whole: train.json split across the steps as any dataset,
    eval.json, all of it, the eval set of every step it feeds (as `eval_only`); the name
    `local/jsonfile` itself, as DeepSpeed-Chat's `--data_path local/jsonfile`, means `./data/`."""

    format: str = "auto"
    """Record layout, one of `FORMATS`. `auto` uses the registered adapter for hub names and
    otherwise looks at the fields of the first row (and `.txt` means `text`)."""

    name: str | None = None
    """Hugging Face config name (the second argument of `datasets.load_dataset`)."""

    hf_split: str = "train"
    """Which Hugging Face split to read; ignored for local .json/.jsonl/.txt files."""

    adapter: str | None = None
    """Key of `shared.data.hf_adapters.ADAPTERS` used to read the rows, e.g. to read a local
    copy of `Anthropic/hh-rlhf`. Defaults to the adapter registered under `path`, if any."""

    weight: float = 1.0
    """Blending weight: this dataset contributes `round(weight * n)` training examples to each
    step it feeds (n = its share of that step). Below 1 subsamples, above 1 repeats, both seeded.
    Eval examples are never reweighted."""

    steps: tuple[str, ...] | None = None
    """Subset of ("sft", "reward", "ppo") this dataset feeds. None: every step its format can
    feed. Its rows are partitioned across these steps in proportion to their `data_split`
    shares, so a dataset listed for one step gives it all its rows."""

    eval_only: bool = False
    """The whole dataset is held-out evaluation data for the steps it feeds (e.g. a `test`
    split, or the demo's eval prompts): it bypasses `data_split`, `eval_fraction` and `weight`.
    A step fed by any eval-only dataset takes its eval set from those alone."""

    def __post_init__(self) -> None:
        owner = "DatasetSpec"
        if not isinstance(self.path, str) or not self.path:
            _fail(owner, "path", self.path, "expected a non-empty string (hub name or path)")
        if self.format not in FORMATS:
            _fail(owner, "format", self.format, f"allowed: {', '.join(FORMATS)}")
        if self.name is not None and not isinstance(self.name, str):
            _fail(owner, "name", self.name, "expected a string or None")
        if not isinstance(self.hf_split, str) or not self.hf_split:
            _fail(owner, "hf_split", self.hf_split, "expected a non-empty split name")
        if self.adapter is not None:
            from shared.data.hf_adapters import ADAPTERS  # lazy: adapters import records only

            if self.adapter not in ADAPTERS:
                _fail(owner, "adapter", self.adapter, f"allowed: {', '.join(sorted(ADAPTERS))}")
            if self.format != "auto":
                _fail(owner, "format", self.format, "must be 'auto' when an adapter is given")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            _fail(owner, "weight", self.weight, "expected a finite positive number")
        if not (math.isfinite(self.weight) and self.weight > 0):
            _fail(owner, "weight", self.weight, "expected a finite positive number")
        if self.steps is not None:
            if isinstance(self.steps, str) or not isinstance(self.steps, Sequence):
                _fail(owner, "steps", self.steps, f"expected a list drawn from {STEPS}")
            steps = tuple(self.steps)
            bad = [s for s in steps if s not in STEPS]
            if bad or not steps or len(set(steps)) != len(steps):
                _fail(owner, "steps", self.steps, f"expected distinct names drawn from {STEPS}")
            object.__setattr__(self, "steps", steps)
        if not isinstance(self.eval_only, bool):
            _fail(owner, "eval_only", self.eval_only, "expected true or false")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | str) -> DatasetSpec:
        """Builds a spec from a YAML mapping, or from a bare string taken as `path`."""
        if isinstance(raw, str):
            return cls(path=raw)
        return cls(**_checked_kwargs(cls, raw))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section: datasets, how they are split, and tokenisation lengths."""

    datasets: tuple[DatasetSpec, ...] = ()
    """Datasets to blend; each is split across the steps it feeds."""

    data_split: str = "2,4,4"
    """Relative shares of each dataset for sft,reward,ppo, as DeepSpeed-Chat's --data_split."""

    eval_fraction: float = 0.05
    """Fraction of each dataset's share of a step held out for that step's eval set, in
    [0, 1). A share of two or more examples holds out at least one when this is positive."""

    unsupervised_dataset_name: str | None = None
    """Plain-text data for the PPO-ptx loss: hub name, local .txt (one document per line),
    .json/.jsonl with a `text` field, or a directory. None: no ptx data."""

    unsupervised_dataset_config_name: str | None = None
    """Hugging Face config name of the unsupervised dataset (e.g. `wikitext-2-raw-v1`)."""

    max_seq_len: int = 512
    """Length of SFT and reward-model sequences (prompt + response), right-padded."""

    max_prompt_seq_len: int = 256
    """Length of PPO prompts, left-padded and truncated from the left (the end is kept).
    SFT and reward prompts are truncated to it as well, so they match what PPO sees."""

    max_answer_seq_len: int = 256
    """Length of generated PPO answers; ptx blocks are max_prompt_seq_len + max_answer_seq_len."""

    end_of_conversation_token: str | None = None
    """Appended to every response (and ptx document). None: the tokenizer's eos token."""

    prompt_response_separator: str = "\nAssistant:"
    """Where a NeMo comparison line's text is split: the prompt runs up to and including the
    last occurrence, the response is the rest."""

    cache_dir: str | None = None
    """Directory for tokenised .npz caches (and Hugging Face downloads). None: no cache."""

    shuffle_seed: int = 1234
    """Seed of the split permutation, blending shuffle and subsampling (DeepSpeed-Chat: 1234)."""

    num_padding_at_beginning: int = 0
    """Pad tokens the tokenizer puts before every sequence (OPT with `pad_with_eos`: 1, its BOS
    `</s>`; 0 otherwise). Read by the reward model when it looks for the end of a sequence;
    the reward step checks it against the tokenizer (`check_padding_at_beginning`)."""

    pad_with_eos: bool = False
    """Pad with the tokenizer's eos token whatever pad token it has, as DeepSpeed-Chat does for
    every non-Llama model (`tokenizer.pad_token = tokenizer.eos_token`); false keeps the
    tokenizer's own pad (the eos only when it has none). DeepSpeed-Chat's OPT recipes need it:
    their `num_padding_at_beginning: 1` counts OPT's BOS `</s>` as a pad."""

    train_on_prompt: bool = False
    """SFT loss on prompt tokens too (DeepSpeed-Chat does so); False masks the prompt."""

    max_line_bytes: int = 16 * 2**20
    """Longest line of a local .json/.jsonl/.txt file, in bytes (16 MiB); a longer one stops
    the run with its file and line, before it is held in memory whole."""

    max_truncated_fraction: float = 0.5
    """Largest share of a step's training rows that may lose tokens to max_seq_len /
    max_prompt_seq_len / max_answer_seq_len, in [0, 1]; above it the step stops before
    training (1 never stops)."""

    max_dropped_fraction: float = 0.5
    """Largest share of the rows feeding a step that may be skipped (null fields, empty or
    identical responses, empty prompts), in [0, 1]; above it the step stops before training."""

    max_unk_fraction: float = 0.05
    """Largest share of a step's text tokens that may be the tokenizer's unknown token, in
    [0, 1]; above it the step stops before training (characters outside the vocabulary)."""

    def __post_init__(self) -> None:
        owner = "DataConfig"
        if isinstance(self.datasets, (str, DatasetSpec)) or not isinstance(self.datasets, Sequence):
            _fail(owner, "datasets", self.datasets, "expected a list of DatasetSpec")
        specs = tuple(self.datasets)
        for i, spec in enumerate(specs):
            if not isinstance(spec, DatasetSpec):
                _fail(owner, f"datasets[{i}]", spec, "expected a DatasetSpec")
        object.__setattr__(self, "datasets", specs)
        parse_data_split(self.data_split)
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)):
            _fail(owner, "eval_fraction", self.eval_fraction, "expected a number in [0, 1)")
        if not 0 <= self.eval_fraction < 1:
            _fail(owner, "eval_fraction", self.eval_fraction, "expected a number in [0, 1)")
        for field in ("unsupervised_dataset_name", "unsupervised_dataset_config_name", "cache_dir"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(owner, field, value, "expected a non-empty string or None")
        for field in ("max_seq_len", "max_prompt_seq_len", "max_answer_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(owner, field, value, "expected a positive integer")
        if self.max_seq_len < 2:
            _fail(owner, "max_seq_len", self.max_seq_len, "expected at least 2 (prompt + answer)")
        eoc = self.end_of_conversation_token
        if eoc is not None and (not isinstance(eoc, str) or not eoc):
            _fail(owner, "end_of_conversation_token", eoc, "expected a non-empty string or None")
        sep = self.prompt_response_separator
        if not isinstance(sep, str) or not sep:
            _fail(owner, "prompt_response_separator", sep, "expected a non-empty string")
        if isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int):
            _fail(owner, "shuffle_seed", self.shuffle_seed, "expected an integer in [0, 2**32)")
        if not 0 <= self.shuffle_seed < 2**32:
            _fail(owner, "shuffle_seed", self.shuffle_seed, "expected an integer in [0, 2**32)")
        pad = self.num_padding_at_beginning
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            _fail(owner, "num_padding_at_beginning", pad, "expected a non-negative integer")
        if not isinstance(self.pad_with_eos, bool):
            _fail(owner, "pad_with_eos", self.pad_with_eos, "expected true or false")
        if not isinstance(self.train_on_prompt, bool):
            _fail(owner, "train_on_prompt", self.train_on_prompt, "expected true or false")
        limit = self.max_line_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            _fail(owner, "max_line_bytes", limit, "expected a positive integer (bytes)")
        for field in ("max_truncated_fraction", "max_dropped_fraction", "max_unk_fraction"):
            value = getattr(self, field)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not (math.isfinite(value) and 0 <= value <= 1)):
                _fail(owner, field, value, "expected a number in [0, 1] (1 never stops)")

    @property
    def step_shares(self) -> tuple[float, float, float]:
        """`data_split` normalised to sum to one, in `STEPS` order."""
        return parse_data_split(self.data_split)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DataConfig:
        """Builds the config from a YAML mapping; `datasets` items may be mappings or paths."""
        kwargs = _checked_kwargs(cls, raw)
        if "datasets" in kwargs:
            items = kwargs["datasets"]
            if isinstance(items, (str, Mapping)):
                items = [items]
            if not isinstance(items, Sequence):
                _fail("DataConfig", "datasets", items, "expected a list of dataset mappings")
            kwargs["datasets"] = tuple(
                item if isinstance(item, DatasetSpec) else DatasetSpec.from_dict(item)
                for item in items
            )
        return cls(**kwargs)


def _checked_kwargs(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(raw).__name__}: {raw!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return dict(raw)
