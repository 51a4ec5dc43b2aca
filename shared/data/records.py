"""Normalised records every reader produces, their step views, and the data report.

Every source (local JSON/JSONL/text, a Hugging Face dataset through its adapter) becomes a list of
one record type. The steps consume views of them: SFT trains on prompt + best response, the reward
model on comparisons, PPO on prompts (keeping the best response as an eval reference).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

from shared.errors import InputError

logger = logging.getLogger("shared.data")


class DataError(InputError):
    """Bad input data; the message names the file and line (or dataset and row) (an
    InputError, so also a ValueError: exit status 2)."""


@dataclasses.dataclass(frozen=True)
class PairwiseExample:
    """A comparison: `chosen` is preferred over `rejected` as a continuation of `prompt`."""

    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class RankingExample:
    """A K-way ranking (K >= 2) of continuations of `prompt`, best first (InstructGPT)."""

    prompt: str
    responses: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A demonstration: `response` continues `prompt`."""

    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """A PPO prompt, with an optional reference answer used only by evaluation metrics."""

    prompt: str
    reference: str | None = None


@dataclasses.dataclass(frozen=True)
class TextExample:
    """A plain-text document for the unsupervised (ptx) language-modelling loss."""

    text: str


Record = PairwiseExample | RankingExample | SFTExample | PromptExample | TextExample

STEP_RECORDS: dict[str, tuple[type, ...]] = {
    "sft": (PairwiseExample, RankingExample, SFTExample),
    "reward": (PairwiseExample, RankingExample),
    "ppo": (PairwiseExample, RankingExample, SFTExample, PromptExample),
}
"""Record types each step can consume (through `step_view`)."""


def steps_for(record_type: type) -> tuple[str, ...]:
    """The steps a record type can feed, in STEPS order."""
    return tuple(step for step, types in STEP_RECORDS.items() if record_type in types)


def step_view(record: Record, step: str) -> Record:
    """Converts a record to what `step` consumes.

    sft: SFTExample(prompt, best response); reward: the comparison itself; ppo:
    PromptExample(prompt, reference=best response).
    """
    if step == "reward":
        if isinstance(record, (PairwiseExample, RankingExample)):
            return record
    elif step == "sft":
        if isinstance(record, SFTExample):
            return record
        if isinstance(record, PairwiseExample):
            return SFTExample(record.prompt, record.chosen)
        if isinstance(record, RankingExample):
            return SFTExample(record.prompt, record.responses[0])
    elif step == "ppo":
        if isinstance(record, PromptExample):
            return record
        if isinstance(record, SFTExample):
            return PromptExample(record.prompt, record.response)
        if isinstance(record, PairwiseExample):
            return PromptExample(record.prompt, record.chosen)
        if isinstance(record, RankingExample):
            return PromptExample(record.prompt, record.responses[0])
    raise DataError(f"a {type(record).__name__} cannot feed step {step!r}")


@dataclasses.dataclass
class DataReport:
    """Counts of everything the data layer dropped, truncated or produced; never silent.

    Keys are `"<scope>/<what>"`, e.g. `"sft.jsonl/skipped/empty_response"`,
    `"ppo/prompt_truncated"`, `"reward/train_examples"`.
    """

    counts: Counter = dataclasses.field(default_factory=Counter)
    notes: list[str] = dataclasses.field(default_factory=list)
    cache_hit: bool = False
    cache_path: str | None = None

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += int(n)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    def merge(self, other: DataReport) -> None:
        self.counts.update(other.counts)
        self.notes.extend(other.notes)

    def summary(self) -> str:
        lines = [f"{key}: {value}" for key, value in sorted(self.counts.items()) if value]
        lines.extend(self.notes)
        if self.cache_path:
            lines.append(f"cache {'hit' if self.cache_hit else 'written'}: {self.cache_path}")
        return "\n".join(lines)

    def log(self, level: int = logging.INFO) -> None:
        """Writes the report to the run log (the console shows the one-line counts and any
        warning; `--verbose` shows this too)."""
        logger.log(level, "data report:\n%s", self.summary(), extra={"console": False})

    def to_json(self) -> str:
        return json.dumps({"counts": dict(sorted(self.counts.items())), "notes": self.notes})

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        raw = json.loads(text)
        return cls(counts=Counter(raw["counts"]), notes=list(raw["notes"]))
