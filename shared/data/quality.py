"""How much of a step's data survived intact: shares truncated, dropped and unknown, the
train/eval overlap, and the limits (`DataConfig.max_*_fraction`) that stop a step before it
trains on data that is mostly cut, skipped or `<unk>`.

Everything is computed from the counts of a `DataReport` (so a report read back from the
tokenised-data cache gives the same figures), under a scope: the step (`sft`, `reward`,
`ppo`, `ptx`) for its training rows, `<step>_eval` for its eval rows.

- truncated_fraction = `<scope>/truncated_rows` / `<scope>/rows`: examples that lost at least
  one token to `max_seq_len`, `max_prompt_seq_len` or `max_answer_seq_len`.
- dropped_fraction = 1 - (1 - a) (1 - b): a = rows skipped while reading the datasets that
  feed the step (null fields, empty or identical responses, empty texts; blank lines are not
  rows) over the rows read, b = rows the step itself dropped (`ppo/empty_prompt`) over the
  rows it encoded: the share of rows that did not reach the batches.
- unk_fraction = `<scope>/unk_tokens` / `<scope>/text_tokens`: tokens of the text (before
  truncation, without the appended end-of-conversation ids) that are the tokenizer's unknown
  token (`tokenize.unknown_token_id`; 0 for tokenizers without one, e.g. byte-level BPE).
- eval_overlap: eval rows identical (as the step sees them) to a training row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from shared.data.config import DataConfig
from shared.data.records import DataError, DataReport, PromptExample, Record

logger = logging.getLogger("shared.data")

STEP_DROPS = ("empty_prompt",)
"""Per-scope counts of rows a step drops after reading (`<scope>/<name>`)."""

READ_SKIPS_IGNORED = ("blank_line",)
"""Reader skip reasons that are not rows (`<label>/skipped/<reason>`)."""


def count_read_drops(report: DataReport, labels: Iterable[str], scope: str) -> None:
    """Adds `<scope>/rows_read` and `<scope>/rows_skipped`: the rows the datasets `labels`
    read (kept or skipped) and those their readers skipped."""
    skipped = kept = 0
    for label in labels:
        prefix = f"{label}/skipped/"
        skipped += sum(
            n for key, n in report.counts.items()
            if key.startswith(prefix) and key[len(prefix):] not in READ_SKIPS_IGNORED
        )
        kept += report.get(f"{label}/records")
    report.add(f"{scope}/rows_read", kept + skipped)
    report.add(f"{scope}/rows_skipped", skipped)


def _key(record: Record) -> object:
    # What the model sees of a row: a PPO prompt's reference answer never reaches it.
    return record.prompt if isinstance(record, PromptExample) else record


def count_eval_overlap(
    train: Sequence[Record], evals: Sequence[Record], report: DataReport, scope: str
) -> int:
    """Counts (as `<scope>/eval_overlap`) and returns the eval rows identical to a training
    row, warning when there is any: eval metrics on them measure memorisation."""
    seen = {_key(r) for r in train}
    overlap = sum(_key(r) in seen for r in evals)
    report.add(f"{scope}/eval_overlap", overlap)
    if overlap:
        message = (
            f"{scope}: {overlap} of {len(evals)} eval rows are identical to training rows "
            "(train/eval overlap); eval metrics on them measure memorisation"
        )
        report.note(message)
        logger.warning(message)
    return overlap


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def data_quality(report: DataReport, scope: str) -> dict[str, float]:
    """The shares of `scope`'s rows truncated and dropped, its `<unk>` share and its
    train/eval overlap (see the module docstring), from the report's counts."""
    rows = report.get(f"{scope}/rows")
    step = scope.removesuffix("_eval")
    read_skipped = _ratio(report.get(f"{step}/rows_skipped"), report.get(f"{step}/rows_read"))
    step_dropped = sum(report.get(f"{scope}/{name}") for name in STEP_DROPS)
    dropped = 1.0 - (1.0 - read_skipped) * (1.0 - _ratio(step_dropped, rows))
    return {
        "rows": float(rows),
        "truncated_fraction": _ratio(report.get(f"{scope}/truncated_rows"), rows),
        "dropped_fraction": dropped,
        "unk_fraction": _ratio(report.get(f"{scope}/unk_tokens"),
                               report.get(f"{scope}/text_tokens")),
        "eval_overlap": float(report.get(f"{step}/eval_overlap")),
    }


def describe_quality(scope: str, quality: dict[str, float]) -> str:
    """One line for the log: `sft: 3.1% of 1200 rows truncated, 0.0% dropped, ...`."""
    return (
        f"{scope}: {quality['truncated_fraction']:.1%} of {int(quality['rows'])} rows "
        f"truncated, {quality['dropped_fraction']:.1%} dropped, "
        f"{quality['unk_fraction']:.2%} of text tokens <unk>, "
        f"{int(quality['eval_overlap'])} eval rows also in train"
    )


_LIMITS = (
    ("truncated_fraction", "max_truncated_fraction", "rows truncated",
     "raise data.max_seq_len / data.max_prompt_seq_len / data.max_answer_seq_len"),
    ("dropped_fraction", "max_dropped_fraction", "rows dropped",
     "see the data report for the reasons (null fields, empty or identical responses, "
     "empty prompts) and fix the data"),
    ("unk_fraction", "max_unk_fraction", "text tokens unknown (<unk>)",
     "the text holds characters outside the tokenizer's vocabulary; use a tokenizer that "
     "covers them or clean the data"),
)


def check_data_quality(report: DataReport, scope: str, config: DataConfig) -> None:
    """Raises a DataError when a share of `data_quality(report, scope)` exceeds its limit
    in `config` (`data.max_truncated_fraction`, `max_dropped_fraction`,
    `max_unk_fraction`), naming the share, the counts, the key and what to change."""
    quality = data_quality(report, scope)
    for name, key, what, hint in _LIMITS:
        limit = getattr(config, key)
        if quality[name] > limit:
            raise DataError(
                f"{scope}: {quality[name]:.1%} of the {what}, above data.{key} = {limit:g} "
                f"({describe_quality(scope, quality)}); {hint}, or raise data.{key} "
                "(1 never stops)"
            )
