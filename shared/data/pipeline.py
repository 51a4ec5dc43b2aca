"""From a DataConfig to each step's numpy batches: read, split, blend, tokenise, cache.

    data = build_step_data(config, tokenizer, "sft")      # StepData[SFTBatch]
    data = build_step_data(config, tokenizer, "reward")   # StepData[PairwiseBatch | RankingBatch]
    data = build_step_data(config, tokenizer, "ppo")      # StepData[PromptBatch]
    ptx = build_ptx_data(config, tokenizer)               # StepData[TextBatch] or None

A directory in DeepSpeed-Chat's `local/jsonfile` layout (`train.json` and `eval.json`, directly
or under `data/`; the name `local/jsonfile` itself means `./data/`) is read whole: `train.json`
as the dataset, `eval.json` as its eval-only companion for the same steps
(`expand_local_jsonfile`).

For one step: every dataset feeding it is read into records, partitioned across the steps it
feeds by `data_split` (seeded, so the three calls see disjoint shares), its share split into
train and eval by `eval_fraction` (unless eval-only datasets feed the step), reweighted, and the
datasets are blended by a seeded shuffle. The views of the records are then tokenised.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic

import numpy as np

from shared.data import cache
from shared.data.batches import B, PairwiseBatch, TextBatch
from shared.data.config import STEPS, DataConfig, DatasetSpec
from shared.data.hf_adapters import ADAPTERS, hf_rows, load_hf_dataset
from shared.data.quality import (
    check_data_quality,
    count_eval_overlap,
    count_read_drops,
    data_quality,
    describe_quality,
)
from shared.data.readers import (
    LOCAL_SUFFIXES,
    Row,
    SkipRow,
    detect_format,
    parse_nemo_comparisons,
    parse_rows,
    read_local_rows,
)
from shared.data.records import (
    DataError,
    DataReport,
    PairwiseExample,
    Record,
    step_view,
    steps_for,
)
from shared.data.splits import hold_out, partition, permutation, reweight
from shared.data.tokenize import (
    check_pad_with_eos,
    check_padding_at_beginning,
    encode_pairwise,
    encode_prompt_batch,
    encode_ranking,
    encode_sft,
    encode_text_blocks,
    end_of_conversation_ids,
    prepare_tokenizer,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class StepData(Generic[B]):
    """One step's tokenised data; `eval` is None when no eval set was asked for."""

    step: str
    train: B
    eval: B | None
    report: DataReport

    @property
    def quality(self) -> dict[str, float]:
        """The training rows' shares truncated, dropped and `<unk>`, and the train/eval
        overlap (`shared.data.quality.data_quality`)."""
        return data_quality(self.report, self.step)


class _Source:
    """One DatasetSpec: where its rows come from and how they become records."""

    def __init__(self, spec: DatasetSpec, config: DataConfig):
        self.spec = spec
        self.config = config
        suffix = os.path.splitext(spec.path)[1]
        self.local_file = os.path.isfile(spec.path) and suffix in LOCAL_SUFFIXES
        self.label = spec.path if self.local_file else f"{spec.path}[{spec.hf_split}]"
        registered = spec.format == "auto" and spec.path in ADAPTERS
        self.adapter = spec.adapter or (spec.path if registered else None)
        self._dataset: Any = None
        self._records: list[Record] | None = None

    def _hf(self) -> Any:
        if self._dataset is None:
            spec = self.spec
            path = spec.path
            looks_local = (
                os.path.isabs(path)
                or path.startswith(("./", "../"))
                or (os.path.splitext(path)[1] in LOCAL_SUFFIXES + (".csv", ".parquet", ".arrow"))
            )
            if looks_local and not os.path.exists(path):
                raise DataError(f"{path}: no such file or directory")
            self._dataset = load_hf_dataset(
                spec.path, spec.name, spec.hf_split, self.config.cache_dir
            )
        return self._dataset

    def fingerprint(self) -> str:
        if os.path.exists(self.spec.path):
            return cache.file_digest(self.spec.path)
        return str(getattr(self._hf(), "_fingerprint", None) or self.label)

    def _rows(self, report: DataReport) -> Iterator[Row]:
        if self.local_file:
            return read_local_rows(
                self.spec.path, report, self.label, max_line_bytes=self.config.max_line_bytes
            )
        dataset = self._hf()
        rows = hf_rows(dataset, self.spec.path, self.spec.hf_split)
        if self.spec.format == "text" and "text" not in dataset.column_names:
            column = dataset.column_names[0]  # as DeepSpeed-Chat's unsupervised data
            return (({"text": row[column]}, where) for row, where in rows)
        return rows

    def records(self, report: DataReport) -> list[Record]:
        if self._records is None:
            self._records = self._read(report)
            report.add(f"{self.label}/records", len(self._records))
        return self._records

    def _read(self, report: DataReport) -> list[Record]:
        rows = self._rows(report)
        if self.adapter is not None:
            adapter = ADAPTERS[self.adapter]
            records = []
            for row, where in rows:
                try:
                    records.append(adapter(row, where))
                except SkipRow as skip:
                    report.add(f"{self.label}/skipped/{skip.reason}")
        elif self.spec.format == "nemo_comparison":
            records = parse_nemo_comparisons(
                rows, self.config.prompt_response_separator, report, self.label
            )
        else:
            fmt = self.spec.format
            if fmt == "auto":
                first = next(rows)
                fmt = detect_format(*first)
                rows = _chain(first, rows)
            records = parse_rows(rows, fmt, report, self.label)
        if not records:
            raise DataError(f"{self.label}: no usable rows (every row was skipped; see report)")
        return records


def _chain(first: Row, rest: Iterator[Row]) -> Iterator[Row]:
    yield first
    yield from rest


def _steps_fed(source: _Source, record_type: type, config: DataConfig) -> tuple[str, ...]:
    """The steps a dataset feeds: its `steps`, or all its records can feed with a share."""
    spec = source.spec
    compatible = steps_for(record_type)
    share = dict(zip(STEPS, config.step_shares, strict=True))
    if spec.steps is not None:
        bad = [s for s in spec.steps if s not in compatible]
        if bad:
            raise DataError(
                f"{source.label}: {record_type.__name__} records cannot feed step(s) {bad}; "
                f"they can feed {list(compatible)}"
            )
        zero = [s for s in spec.steps if share[s] == 0 and not spec.eval_only]
        if zero:
            raise DataError(
                f"{source.label}: lists step(s) {zero} but data_split {config.data_split!r} "
                "gives them a zero share"
            )
        return tuple(s for s in STEPS if s in spec.steps)
    feeds = tuple(s for s in compatible if spec.eval_only or share[s] > 0)
    if not feeds:
        raise DataError(
            f"{source.label}: {record_type.__name__} records feed no step (they can feed "
            f"{list(compatible)}, data_split {config.data_split!r}); ptx text goes in "
            "unsupervised_dataset_name"
        )
    return feeds


def _select(sources: list[_Source], config: DataConfig, step: str, report: DataReport):
    """(train, eval) record views for `step`; eval is None when no eval set is asked for."""
    fed = []
    for index, source in enumerate(sources):
        records = source.records(report)
        if step in _steps_fed(source, type(records[0]), config):
            fed.append((index, source))
    if not fed:
        raise DataError(f"no dataset feeds step {step!r}; check `steps` and `data_split`")
    count_read_drops(report, [source.label for _, source in fed], step)
    eval_from_eval_only = any(s.spec.eval_only for _, s in fed)
    seed = config.shuffle_seed
    train: list[Record] = []
    evals: list[Record] = []
    for index, source in fed:
        records = source.records(report)
        views = [step_view(r, step) for r in records]
        if source.spec.eval_only:
            evals.extend(views)
            report.add(f"{source.label}/{step}/eval", len(views))
            continue
        feeds = _steps_fed(source, type(records[0]), config)
        shares = [config.step_shares[k] if s in feeds else 0.0 for k, s in enumerate(STEPS)]
        mine = partition(len(records), shares, seed)[STEPS.index(step)]
        if len(mine) == 0:
            raise DataError(
                f"{source.label}: empty after split: none of its {len(records)} records goes "
                f"to step {step!r} (data_split {config.data_split!r}, feeds {list(feeds)})"
            )
        fraction = 0.0 if eval_from_eval_only else config.eval_fraction
        train_idx, eval_idx = hold_out(mine, fraction)
        train_idx = train_idx[reweight(len(train_idx), source.spec.weight, [seed, index])]
        if len(train_idx) == 0:
            raise DataError(
                f"{source.label}: weight {source.spec.weight} leaves none of its examples for "
                f"step {step!r}"
            )
        train.extend(views[i] for i in train_idx)
        evals.extend(views[i] for i in eval_idx)
        report.add(f"{source.label}/{step}/train", len(train_idx))
        report.add(f"{source.label}/{step}/eval", len(eval_idx))
    if not train:
        raise DataError(f"step {step!r}: no training examples after split")
    train = [train[i] for i in permutation(len(train), seed)]
    if not eval_from_eval_only and config.eval_fraction == 0:
        return train, None
    if not evals:
        raise DataError(
            f"step {step!r}: eval set empty after split (eval_fraction "
            f"{config.eval_fraction}); add data or set eval_fraction to 0"
        )
    count_eval_overlap(train, evals, report, step)
    return train, evals


def _encode(
    step: str,
    records: list[Record],
    tokenizer,
    config: DataConfig,
    eoc: list[int],
    report: DataReport,
    pairwise_only: bool,
):
    lengths = dict(max_seq_len=config.max_seq_len, max_prompt_seq_len=config.max_prompt_seq_len)
    if step == "sft":
        return encode_sft(
            tokenizer,
            records,
            eoc_ids=eoc,
            train_on_prompt=config.train_on_prompt,
            report=report,
            **lengths,
        )
    if step == "reward":
        encode = encode_pairwise if pairwise_only else encode_ranking
        batch = encode(tokenizer, records, eoc_ids=eoc, report=report, **lengths)
        if config.num_padding_at_beginning > 0:
            report.add(
                "reward/missing_padding_at_beginning",
                _missing_padding_at_beginning(
                    batch, tokenizer.pad_token_id, config.num_padding_at_beginning
                ),
            )
        return batch
    return encode_prompt_batch(
        tokenizer, records, max_prompt_seq_len=config.max_prompt_seq_len, report=report
    )


def _missing_padding_at_beginning(batch, pad_id: int, k: int) -> int:
    """Reward-model sequences that do not start with k pad tokens: a prompt truncated from the
    left loses its BOS, which `num_padding_at_beginning` counts on (DeepSpeed-Chat truncates
    step-2 sequences from the right and keeps it)."""
    if isinstance(batch, PairwiseBatch):
        rows = [batch.chosen_input_ids, batch.rejected_input_ids]
    else:
        valid = np.arange(batch.input_ids.shape[1])[None, :] < batch.num_valid[:, None]
        rows = [batch.input_ids[valid]]
    return int(sum(np.sum(~np.all(ids[:, :k] == pad_id, axis=1)) for ids in rows))


def _cache_path(config: DataConfig, step: str, sources: list[_Source], tokenizer) -> str | None:
    if config.cache_dir is None:
        return None
    settings = dataclasses.asdict(config)
    settings.pop("cache_dir")
    settings.pop("pad_with_eos")  # it acts through the tokenizer, whose fingerprint is in the key
    for limit in ("max_line_bytes", "max_truncated_fraction", "max_dropped_fraction",
                  "max_unk_fraction"):  # they stop a run but never change a batch
        settings.pop(limit)
    key = cache.cache_key(
        {
            "step": step,
            "sources": [s.fingerprint() for s in sources],
            "config": settings,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
    )
    return os.path.join(config.cache_dir, f"{step}-{key}.npz")


def _from_cache(step: str, path: str | None, config: DataConfig) -> StepData | None:
    if path is None or not os.path.exists(path):
        return None
    batches, report = cache.load(path, ("train", "eval"))
    report.cache_hit, report.cache_path = True, path
    report.log()
    check_data_quality(report, step, config)
    return StepData(step, batches["train"], batches["eval"], report)


def _finish(
    step: str, path: str | None, train, eval_, report: DataReport, config: DataConfig
) -> StepData:
    """Notes the data quality, caches, logs the report, then applies the quality limits (the
    cache holds the batches either way: the limits are not part of its key)."""
    report.note(describe_quality(step, data_quality(report, step)))
    if eval_ is not None:
        report.note(describe_quality(f"{step}_eval", data_quality(report, f"{step}_eval")))
    if path is not None:
        cache.save(path, {"train": train, "eval": eval_}, report)
        report.cache_path = path
    report.log()
    check_data_quality(report, step, config)
    return StepData(step, train, eval_, report)


def read_dataset(
    spec: DatasetSpec, config: DataConfig | None = None
) -> tuple[list[Record], DataReport]:
    """The records one dataset reads into, and the report of what was skipped.

    `config` supplies the NeMo separator and the Hugging Face cache (default: DataConfig()).
    """
    report = DataReport()
    records = _Source(spec, config or DataConfig()).records(report)
    return records, report


JSONFILE_DIRS = ("", "data")
"""Where DeepSpeed-Chat's `local/jsonfile` keeps train.json and eval.json, relative to the
directory given (dschat/utils/data/raw_datasets.py LocalJsonFileDataset reads `data/`)."""


LOCAL_JSONFILE = "local/jsonfile"
"""DeepSpeed-Chat's `--data_path` name for its own `data/` directory; here `data/` under the
working directory."""


def expand_local_jsonfile(spec: DatasetSpec) -> list[DatasetSpec]:
    """``[spec]``, or for a directory in DeepSpeed-Chat's `local/jsonfile` layout the spec of
    its `train.json` and, when present, of its `eval.json` as eval-only data for the same
    steps (DeepSpeed-Chat evaluates on eval.json; reading the directory through `datasets`
    would take the train split only)."""
    if spec.path == LOCAL_JSONFILE:
        if not os.path.isfile(os.path.join("data", "train.json")):
            raise DataError(f"{LOCAL_JSONFILE}: DeepSpeed-Chat's name for data/train.json and "
                            f"data/eval.json, not found under {os.getcwd()}; give the "
                            "directory that holds them instead")
        spec = dataclasses.replace(spec, path=os.path.abspath("data"))
    if not os.path.isdir(spec.path):
        return [spec]
    for sub in JSONFILE_DIRS:
        train = os.path.join(spec.path, sub, "train.json")
        if os.path.isfile(train):
            break
    else:
        return [spec]
    specs = [dataclasses.replace(spec, path=train)]
    eval_path = os.path.join(os.path.dirname(train), "eval.json")
    if os.path.isfile(eval_path) and not spec.eval_only:
        specs.append(dataclasses.replace(spec, path=eval_path, eval_only=True))
    return specs


def build_step_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, step: str) -> StepData:
    """Train and eval batches of one step ("sft", "reward" or "ppo") as fixed-shape arrays.

    Gives the tokenizer a pad token first if it lacks one (see `prepare_tokenizer`); with
    `data.pad_with_eos` the tokenizer must already pad with its eos (`check_pad_with_eos`).
    The reward step checks `data.num_padding_at_beginning` against the tokenizer
    (`check_padding_at_beginning`) and, when it is > 0, counts the sequences that lost their
    padding at the beginning to left truncation (`reward/missing_padding_at_beginning`). It
    returns a PairwiseBatch when every example is a comparison, else a RankingBatch
    (comparisons as rankings of two).
    """
    if step not in STEPS:
        raise ValueError(f"step: got {step!r}; allowed: {', '.join(STEPS)}")
    if not config.datasets:
        raise DataError(f"DataConfig.datasets is empty: no dataset feeds step {step!r}")
    prepare_tokenizer(tokenizer)
    check_pad_with_eos(tokenizer, config.pad_with_eos)
    if step == "reward":
        check_padding_at_beginning(tokenizer, config.num_padding_at_beginning)
    sources = [_Source(spec, config) for given in config.datasets
               for spec in expand_local_jsonfile(given)]
    path = _cache_path(config, step, sources, tokenizer)
    cached = _from_cache(step, path, config)
    if cached is not None:
        return cached
    report = DataReport()
    train_records, eval_records = _select(sources, config, step, report)
    pairwise_only = all(
        isinstance(r, PairwiseExample) for r in train_records + (eval_records or [])
    )
    eoc = end_of_conversation_ids(tokenizer, config.end_of_conversation_token)
    train = _encode(step, train_records, tokenizer, config, eoc, report, pairwise_only)
    eval_ = None
    if eval_records is not None:
        # eval truncations are counted under "<step>_eval/..." so the train counts stay exact
        eval_report = DataReport()
        eval_ = _encode(step, eval_records, tokenizer, config, eoc, eval_report, pairwise_only)
        for key, n in eval_report.counts.items():
            report.add(key.replace(f"{step}/", f"{step}_eval/", 1), n)
    report.add(f"{step}/train_examples", len(train))
    report.add(f"{step}/eval_examples", 0 if eval_ is None else len(eval_))
    return _finish(step, path, train, eval_, report, config)


def build_ptx_data(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> StepData[TextBatch] | None:
    """The unsupervised (ptx) blocks of max_prompt_seq_len + max_answer_seq_len tokens, all for
    training; None when `unsupervised_dataset_name` is not set."""
    if config.unsupervised_dataset_name is None:
        return None
    prepare_tokenizer(tokenizer)
    check_pad_with_eos(tokenizer, config.pad_with_eos)
    spec = DatasetSpec(
        config.unsupervised_dataset_name,
        format="text",
        name=config.unsupervised_dataset_config_name,
    )
    source = _Source(spec, config)
    path = _cache_path(config, "ptx", [source], tokenizer)
    cached = _from_cache("ptx", path, config)
    if cached is not None:
        return cached
    report = DataReport()
    texts = [record.text for record in source.records(report)]
    count_read_drops(report, [source.label], "ptx")
    report.add("ptx/rows", len(texts))
    eoc = end_of_conversation_ids(tokenizer, config.end_of_conversation_token)
    train = encode_text_blocks(
        tokenizer,
        texts,
        eoc_ids=eoc,
        report=report,
        block_len=config.max_prompt_seq_len + config.max_answer_seq_len,
    )
    return _finish("ptx", path, train, None, report, config)
