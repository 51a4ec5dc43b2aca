"""Fixed-shape numpy batches that both backends consume.

Token ids and masks are int32 (JAX's default integer width; torch converts with
`torch.from_numpy(x).long()`). Shapes use N examples, L = max_seq_len, P = max_prompt_seq_len,
A = max_answer_seq_len, K = the largest ranking size. Optional string fields are numpy unicode
arrays so that every field indexes, saves and loads the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

B = TypeVar("B", bound="ArrayBatch")


@dataclasses.dataclass(frozen=True)
class ArrayBatch:
    """Base of the batch types: every field is an array (or None) whose first axis is N."""

    def __len__(self) -> int:
        return int(getattr(self, dataclasses.fields(self)[0].name).shape[0])

    def __post_init__(self) -> None:
        n = None
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{type(self).__name__}.{field.name} must be a numpy array")
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                raise ValueError(
                    f"{type(self).__name__}.{field.name} has {value.shape[0]} rows, expected {n}"
                )

    def take(self: B, indices: np.ndarray | slice) -> B:
        """The examples at `indices` (first axis) of every field, as the same batch type."""
        return type(self)(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[indices]
                for f in dataclasses.fields(self)
            }
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The non-None fields by name (what `np.savez` stores)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_arrays(cls: type[B], arrays: Mapping[str, Any]) -> B:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: np.asarray(arrays[name]) if name in arrays else None for name in names})


@dataclasses.dataclass(frozen=True)
class SFTBatch(ArrayBatch):
    """Prompt + response + end-of-conversation, right-padded to L.

    loss_mask[i, t] = 1 where input_ids[i, t] is a training target (response tokens, or every
    real token with train_on_prompt). It is aligned with input_ids, so a causal LM's loss is
    taken on logits[:, :-1] against input_ids[:, 1:] weighted by loss_mask[:, 1:].
    """

    input_ids: np.ndarray  # [N, L] int32
    attention_mask: np.ndarray  # [N, L] int32, 1 on real tokens
    loss_mask: np.ndarray  # [N, L] int32


@dataclasses.dataclass(frozen=True)
class PairwiseBatch(ArrayBatch):
    """Chosen and rejected sequences (prompt + response + eoc), each right-padded to L.

    prompt_lengths[i] is the length of the (identically truncated) prompt both sequences of
    row i start with, so tokens `prompt_lengths[i]:` of a sequence are its answer (DPO's
    log-probs are taken over them); None in batches built without it.
    """

    chosen_input_ids: np.ndarray  # [N, L] int32
    chosen_attention_mask: np.ndarray  # [N, L] int32
    rejected_input_ids: np.ndarray  # [N, L] int32
    rejected_attention_mask: np.ndarray  # [N, L] int32
    prompt_lengths: np.ndarray | None = None  # [N] int32


@dataclasses.dataclass(frozen=True)
class RankingBatch(ArrayBatch):
    """K-way rankings, best first; rows k >= num_valid[i] are all padding (mask 0)."""

    input_ids: np.ndarray  # [N, K, L] int32
    attention_mask: np.ndarray  # [N, K, L] int32
    num_valid: np.ndarray  # [N] int32, 2 <= num_valid <= K


@dataclasses.dataclass(frozen=True)
class PromptBatch(ArrayBatch):
    """PPO prompts, left-padded to P (the end of a long prompt is kept).

    prompt_text holds the prompts as read; reference the reference answers ("" where a
    prompt has none), or None when no prompt has one. Both are for eval metrics only.
    """

    prompt_input_ids: np.ndarray  # [N, P] int32
    prompt_attention_mask: np.ndarray  # [N, P] int32
    prompt_text: np.ndarray | None = None  # [N] str
    reference: np.ndarray | None = None  # [N] str


@dataclasses.dataclass(frozen=True)
class TextBatch(ArrayBatch):
    """ptx language-modelling blocks of P + A tokens; only the last block can have padding."""

    input_ids: np.ndarray  # [N, P + A] int32
    attention_mask: np.ndarray  # [N, P + A] int32


BATCH_TYPES: dict[str, type[ArrayBatch]] = {
    cls.__name__: cls for cls in (SFTBatch, PairwiseBatch, RankingBatch, PromptBatch, TextBatch)
}
