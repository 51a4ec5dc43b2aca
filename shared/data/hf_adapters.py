"""Hugging Face datasets: loading through `datasets`, and adapters from hub schemas to records.

`ADAPTERS` maps a hub name to a function `(row, where) -> Record` that reads one row of that
dataset's schema (as DeepSpeed-Chat's `raw_datasets.py` reads them). A dataset whose path is a
registered hub name uses its adapter; a local copy in the same schema selects one with
`DatasetSpec(adapter=...)`. Adapters raise `SkipRow` for rows to drop (counted in the report).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from shared.data.readers import Row, SkipRow, get_str, make_pair, split_common_prompt
from shared.data.records import DataError, PairwiseExample, Record

Adapter = Callable[[Mapping[str, Any], str], Record]

_HH_ASSISTANT = "\n\nAssistant:"


def _prompt_chosen_rejected(row: Mapping[str, Any], where: str) -> PairwiseExample:
    """Dahoas/rm-static and Dahoas/full-hh-rlhf: the prompt ends with "\\n\\nAssistant:" and
    chosen/rejected are the replies (the extra `response` column repeats `chosen`)."""
    fmt = "Dahoas/rm-static"
    return make_pair(
        get_str(row, "prompt", where, fmt),
        get_str(row, "chosen", where, fmt),
        get_str(row, "rejected", where, fmt),
    )


def _synthetic_instruct(row: Mapping[str, Any], where: str) -> PairwiseExample:
    """Dahoas/synthetic-instruct-gptj-pairwise: a bare instruction, wrapped in the
    " Human: ... Assistant:" template DeepSpeed-Chat uses; replies get a leading space."""
    fmt = "Dahoas/synthetic-instruct-gptj-pairwise"
    prompt = get_str(row, "prompt", where, fmt)
    return make_pair(
        f" Human: {prompt} Assistant:",
        " " + get_str(row, "chosen", where, fmt),
        " " + get_str(row, "rejected", where, fmt),
    )


def _yitingxie(row: Mapping[str, Any], where: str) -> PairwiseExample:
    """yitingxie/rlhf-reward-datasets: the prompt stops before "Assistant:", which starts both
    replies; the marker moves to the prompt and the replies keep what follows it."""
    fmt = "yitingxie/rlhf-reward-datasets"
    chosen = get_str(row, "chosen", where, fmt)
    rejected = get_str(row, "rejected", where, fmt)
    return make_pair(
        get_str(row, "prompt", where, fmt) + "Assistant:",
        chosen.split("Assistant:")[-1],
        rejected.split("Assistant:")[-1],
    )


def _anthropic_hh(row: Mapping[str, Any], where: str) -> PairwiseExample:
    """Anthropic/hh-rlhf: only full dialogues `chosen` and `rejected`; the prompt is their
    common prefix up to and including its last "\\n\\nAssistant:"."""
    fmt = "Anthropic/hh-rlhf"
    chosen = get_str(row, "chosen", where, fmt)
    rejected = get_str(row, "rejected", where, fmt)
    split = split_common_prompt(chosen, rejected, _HH_ASSISTANT)
    if split is None:
        raise SkipRow("no_common_prompt")
    return make_pair(*split)


ADAPTERS: dict[str, Adapter] = {
    "Dahoas/rm-static": _prompt_chosen_rejected,
    "Dahoas/full-hh-rlhf": _prompt_chosen_rejected,
    "Dahoas/synthetic-instruct-gptj-pairwise": _synthetic_instruct,
    "yitingxie/rlhf-reward-datasets": _yitingxie,
    "Anthropic/hh-rlhf": _anthropic_hh,
}
"""Hub name -> row adapter. Add a dataset by adding an entry."""


def load_hf_dataset(path: str, name: str | None, split: str, cache_dir: str | None) -> Any:
    """One split of a hub dataset, a local data directory, a `save_to_disk` directory, or a
    local .csv/.parquet/.arrow file, as a `datasets.Dataset`."""
    import datasets  # heavy import, deferred to when a Hugging Face source is used

    hf_cache = os.path.join(cache_dir, "hf_datasets") if cache_dir else None
    try:
        saved = ("state.json", "dataset_dict.json")  # written by save_to_disk
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in saved):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split {split!r}; has {sorted(loaded)}")
                loaded = loaded[split]
            return loaded
        if os.path.isfile(path):
            builder = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(
                os.path.splitext(path)[1]
            )
            if builder is None:
                raise DataError(
                    f"{path}: unsupported file type; use .json, .jsonl, .txt, "
                    ".csv, .parquet or .arrow"
                )
            return datasets.load_dataset(
                builder, data_files={split: path}, split=split, cache_dir=hf_cache
            )
        return datasets.load_dataset(path, name, split=split, cache_dir=hf_cache)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the cause, name the dataset
        raise DataError(f"{path} (config {name!r}, split {split!r}): could not load: {e}") from e


def hf_rows(dataset: Any, label: str, split: str) -> Iterator[Row]:
    """Yields (row, "label[split] row i") for a `datasets.Dataset`; i counts from 0."""
    if len(dataset) == 0:
        raise DataError(f"{label}[{split}]: dataset is empty (no rows)")
    for i, row in enumerate(dataset):
        yield row, f"{label}[{split}] row {i}"
