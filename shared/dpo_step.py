"""Offline DPO as a step (``rlhf dpo``, pipeline ``[sft, dpo]``), once for both backends.

The step is the supervised loop (`shared.supervised_loop`) with a frozen reference:

- **Policy**: starts from the SFT model (``<run>/sft/final`` in a pipeline, else ``--actor``
  or ``model.actor_model_name_or_path``, else a fresh ``model.actor_config``), exactly where
  the SFT step itself would start (`shared.supervised_loop.model_source`).
- **Reference**: the policy's starting weights, frozen. Its sequence log-probs on the step's
  fixed comparisons never change, so they are computed once, by the starting policy, before
  the first optimiser step (`DPOLoop.fit`; TRL's ``precompute_ref_log_probs``) and kept in
  every checkpoint's loop state, so a resumed run uses the very same numbers and no second
  model is held in memory. At step 0 policy = reference, so the sigmoid loss is log 2.
- **Data**: the comparisons the reward step reads (`build_step_data(..., "reward")`: every
  pairwise dataset feeding ``reward`` by its ``steps`` or by default, with the reward step's
  share of ``data_split`` and its eval split), as `PreferenceBatch`: each answer's tokens are
  marked by ``loss_mask`` (the tokens after the shared prompt, end-of-conversation included).
  Rankings of more than two answers are refused.
- **Loss**: `shared.dpo.dpo_loss` on `answer_logprobs` (sums over the answer tokens, means
  for IPO as TRL), each micro-batch's sum divided by the optimiser step's global pair count,
  so micro-batch and rank splits do not change the gradient (as the reward step normalises).

Metrics (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins`` (global means over the step's pairs), ``lr``,
``grad_norm``; eval: the same with ``eval_`` in front; the held-out ``eval.metric`` of the
final policy goes to ``summary.json`` like SFT's. Nothing here imports torch or jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from shared._array import Array
from shared.data import DataError, PairwiseBatch, StepData, build_step_data
from shared.data.batches import ArrayBatch
from shared.dpo import dpo_loss, sequence_logprobs
from shared.errors import InputError
from shared.logprobs import token_logprobs
from shared.supervised_loop import SupervisedBackend, SupervisedLoop

__all__ = ["DATA_STEP", "DPOBackend", "DPOEvalMixin", "DPOLoop", "DPOOptions", "METRIC_KEYS",
           "PreferenceBatch", "answer_logprobs", "dpo_eval_sums", "dpo_metrics",
           "dpo_micro_loss", "preference_batch"]

DATA_STEP = "reward"
"""The data step whose comparisons DPO trains on (`build_step_data`)."""

METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
"""TRL's DPO statistics (`shared.dpo.dpo_loss`), logged as global means over the pairs."""


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    """The loss settings of ``config.dpo`` (hashable: a JAX static argument)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, section: Any) -> DPOOptions:
        return cls(float(section.beta), str(section.loss_type), float(section.label_smoothing))

    @property
    def average(self) -> bool:
        """Length-averaged sequence log-probs (IPO, as TRL)."""
        return self.loss_type == "ipo"


@dataclasses.dataclass(frozen=True)
class PreferenceBatch(ArrayBatch):
    """Comparisons for DPO: chosen and rejected sequences, right-padded to L, with

    - ``*_loss_mask`` [N, L] int32: 1 on the answer tokens (after the shared prompt, up to
      and including the end-of-conversation), aligned with ``*_input_ids`` as SFT's
      ``loss_mask``: a causal LM's log-probs are ``logits[:, :-1]`` against ``ids[:, 1:]``
      weighted by ``loss_mask[:, 1:]``;
    - ``ref_*_logprobs`` [N] float32: the reference's sequence log-probs (None until
      `DPOLoop` has computed them).
    """

    chosen_input_ids: np.ndarray
    chosen_attention_mask: np.ndarray
    chosen_loss_mask: np.ndarray
    rejected_input_ids: np.ndarray
    rejected_attention_mask: np.ndarray
    rejected_loss_mask: np.ndarray
    ref_chosen_logprobs: np.ndarray | None = None
    ref_rejected_logprobs: np.ndarray | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logprobs is not None and self.ref_rejected_logprobs is not None


def _answer_mask(attention_mask: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
    positions = np.arange(attention_mask.shape[1])[None, :]
    return ((positions >= prompt_lengths[:, None]) & (attention_mask > 0)).astype(np.int32)


def preference_batch(pairs: Any, *, split: str = "train") -> PreferenceBatch:
    """A `PreferenceBatch` (without reference log-probs) from the reward step's
    `PairwiseBatch`; anything else is refused naming what DPO needs."""
    if not isinstance(pairs, PairwiseBatch):
        raise InputError(
            f"dpo: the {split} comparisons are {type(pairs).__name__}, rankings of more than "
            "two answers; DPO trains on pairs (prompt, chosen, rejected): give it pairwise "
            "datasets (format: pairwise) feeding the reward step")
    if pairs.prompt_lengths is None:
        raise InputError("dpo: the comparisons carry no prompt lengths (a tokenised-data cache "
                         "written before DPO existed?); delete data.cache_dir and run again")
    lengths = np.asarray(pairs.prompt_lengths)
    return PreferenceBatch(
        pairs.chosen_input_ids, pairs.chosen_attention_mask,
        _answer_mask(pairs.chosen_attention_mask, lengths),
        pairs.rejected_input_ids, pairs.rejected_attention_mask,
        _answer_mask(pairs.rejected_attention_mask, lengths))


# ----------------------------------------------------------------------- the math, any backend


def answer_logprobs(logits: Array, input_ids: Array, loss_mask: Array, *,
                    average: bool = False) -> Array:
    """[N] log pi(answer | prompt) of a causal LM: the next-token log-probs of
    ``logits[:, :-1]`` against ``input_ids[:, 1:]`` summed (``average``: meaned) over the
    answer tokens ``loss_mask[:, 1:]`` (`shared.dpo.sequence_logprobs`)."""
    token_lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return sequence_logprobs(token_lp, loss_mask[:, 1:], average=average)


def dpo_micro_loss(chosen_logprobs: Array, rejected_logprobs: Array,
                   ref_chosen_logprobs: Array, ref_rejected_logprobs: Array,
                   options: DPOOptions, normalizer: Any) -> tuple[Array, dict[str, Array]]:
    """One micro-batch's share of an optimiser step: ``dpo_loss`` summed over its B pairs and
    divided by ``normalizer`` (the step's global pair count), and its statistics weighted by
    B / normalizer, so the sums over the step's micro-batches (and ranks) are the step's loss
    and the global means of ``METRIC_KEYS``. Returns ``(loss, {"loss", *METRIC_KEYS})``."""
    loss, stats = dpo_loss(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs,
                           ref_rejected_logprobs, beta=options.beta,
                           loss_type=options.loss_type,
                           label_smoothing=options.label_smoothing, normalizer=normalizer)
    share = chosen_logprobs.shape[0] / normalizer
    return loss, {"loss": loss, **{key: stats[key] * share for key in METRIC_KEYS}}


def dpo_eval_sums(chosen_logprobs: np.ndarray, rejected_logprobs: np.ndarray,
                  batch: PreferenceBatch, valid: np.ndarray,
                  options: DPOOptions) -> dict[str, float]:
    """Additive eval statistics of the rows where ``valid``, from the policy's sequence
    log-probs of a chunk (numpy, every row of it): ``pairs`` and the sums of the loss and of
    each of ``METRIC_KEYS``."""
    rows = np.flatnonzero(np.asarray(valid, bool))
    sums = {"pairs": float(rows.size), "loss": 0.0, **dict.fromkeys(METRIC_KEYS, 0.0)}
    if rows.size == 0:
        return sums
    pick = [np.asarray(a, np.float64)[rows] for a in (
        chosen_logprobs, rejected_logprobs, batch.ref_chosen_logprobs,
        batch.ref_rejected_logprobs)]
    loss, stats = dpo_loss(*pick, beta=options.beta, loss_type=options.loss_type,
                           label_smoothing=options.label_smoothing, normalizer=1.0)
    sums["loss"] = float(loss)
    sums.update({key: float(stats[key]) * rows.size for key in METRIC_KEYS})
    return sums


def dpo_metrics(sums: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """``loss`` and ``METRIC_KEYS`` as means over ``sums["pairs"]``, each prefixed."""
    pairs = max(float(sums.get("pairs", 0.0)), 1.0)
    return {f"{prefix}{key}": float(sums.get(key, 0.0)) / pairs for key in ("loss", *METRIC_KEYS)}


# ----------------------------------------------------------------------- backends and the loop


class DPOBackend(SupervisedBackend, Protocol):
    """`SupervisedBackend` plus the policy's sequence log-probs of a chunk."""

    def sequence_logprobs(self, batch: PreferenceBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(chosen, rejected)`` [N] float sequence log-probs of the current policy on a
        global chunk (all processes' rows, every process gets all of them; no gradients),
        `answer_logprobs` with ``DPOOptions.average``."""


class DPOEvalMixin:
    """``eval_sums`` of a DPO backend from its ``sequence_logprobs`` (before its trainer base
    class in the bases, so it replaces the base's)."""

    def eval_sums(self, batch: PreferenceBatch, valid: np.ndarray) -> dict[str, float]:
        chosen, rejected = self.sequence_logprobs(batch)
        return dpo_eval_sums(chosen, rejected, batch, valid,
                             DPOOptions.from_config(self.config.dpo))


class DPOLoop(SupervisedLoop):
    """`SupervisedLoop` of the ``dpo`` step: `PreferenceBatch` data and the reference
    log-probs, computed by the starting policy before the first step and kept in the
    checkpoints' loop state (``reference``)."""

    @classmethod
    def build_data(cls, config: Any, tokenizer: Any, step: str = "dpo") -> StepData:
        try:
            data = build_step_data(config.data, tokenizer, DATA_STEP)
        except DataError as err:
            raise DataError(f"dpo trains on the reward step's comparisons: {err}") from err
        train = preference_batch(data.train, split="train")
        evals = None if data.eval is None else preference_batch(data.eval, split="eval")
        return dataclasses.replace(data, train=train, eval=evals)

    def __init__(self, config: Any, step: str = "dpo", **kwargs: Any):
        super().__init__(config, step, **kwargs)
        self.options = DPOOptions.from_config(config.dpo)

    @property
    def has_reference(self) -> bool:
        return self.data.train.has_reference

    def _attach(self, reference: Mapping[str, np.ndarray]) -> None:
        def with_ref(batch: PreferenceBatch | None, split: str) -> PreferenceBatch | None:
            if batch is None:
                return None
            chosen = np.asarray(reference[f"{split}_chosen"], np.float32)
            rejected = np.asarray(reference[f"{split}_rejected"], np.float32)
            if chosen.shape != (len(batch),) or rejected.shape != (len(batch),):
                raise ValueError(f"dpo: the reference log-probs of the {split} split have "
                                 f"{chosen.shape[0]} rows; the split has {len(batch)}")
            return dataclasses.replace(batch, ref_chosen_logprobs=chosen,
                                       ref_rejected_logprobs=rejected)

        self.data = dataclasses.replace(self.data, train=with_ref(self.data.train, "train"),
                                        eval=with_ref(self.data.eval, "eval"))
        self.iterator.data = self.data.train  # same rows and order: only the fields grow

    def reference_logprobs(self, backend: DPOBackend, batch: PreferenceBatch
                           ) -> tuple[np.ndarray, np.ndarray]:
        """``backend.sequence_logprobs`` over all of ``batch`` in global chunks of
        ``per_device_eval_batch_size x data-parallel size`` rows (the last padded)."""
        width = self.section.per_device_eval_batch_size * self.data_parallel_size
        rows = len(batch)
        padded = -(-rows // width) * width
        order = np.minimum(np.arange(padded), rows - 1)
        chosen, rejected = [], []
        for start in range(0, padded, width):
            c, r = backend.sequence_logprobs(batch.take(order[start:start + width]))
            chosen.append(np.asarray(c, np.float32))
            rejected.append(np.asarray(r, np.float32))
        return np.concatenate(chosen)[:rows], np.concatenate(rejected)[:rows]

    def compute_reference(self, backend: DPOBackend) -> None:
        """The reference log-probs of the train and eval comparisons from ``backend``'s
        current (starting) policy."""
        reference = {}
        with self.timer.phase("reference"):
            for split in ("train", "eval"):
                batch = getattr(self.data, split)
                if batch is not None:
                    (reference[f"{split}_chosen"],
                     reference[f"{split}_rejected"]) = self.reference_logprobs(backend, batch)
        self._attach(reference)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.has_reference:
            state["reference"] = {
                f"{split}_{side}": getattr(batch, f"ref_{side}_logprobs").tolist()
                for split, batch in (("train", self.data.train), ("eval", self.data.eval))
                if batch is not None for side in ("chosen", "rejected")}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "reference" not in state:
            raise ValueError("dpo: the checkpoint holds no reference log-probs")
        self._attach(state["reference"])

    def fit(self, backend: DPOBackend, *, resume: bool = False) -> dict[str, float]:
        """Resume (with ``resume``) or compute the reference log-probs, then
        `SupervisedLoop.fit`."""
        if resume:
            self.resume(backend)
        if not self.has_reference:
            self.compute_reference(backend)
        return super().fit(backend, resume=False)

