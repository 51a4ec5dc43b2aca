"""Offline DPO (`rlhf dpo`) in JAX: the JAX side of `shared.dpo_step`.

Everything but the forward passes is shared: the loop, the data (the reward step's
comparisons as `PreferenceBatch`), the reference log-probs (computed once by the starting
policy, kept in the checkpoints), the loss (`shared.dpo.dpo_loss` via
`shared.dpo_step.dpo_micro_loss`, divided by the step's global pair count) and the metrics.
This trainer is the SFT trainer (same model, export and held-out metric) with a DPO loss in
the jitted step.

Example::

    from jax_rlhf.train.dpo import DPOTrainer
    from shared.config import load_config

    entry = DPOTrainer(load_config("configs/demo-dpo.yaml"), run_dir="runs/mine",
                       model_name_or_path="runs/mine/sft/final").run()
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_rlhf import sharding
from jax_rlhf.params import to_host
from jax_rlhf.train.sft import SFTTrainer
from shared.dpo_step import (
    DPOEvalMixin,
    DPOLoop,
    DPOOptions,
    PreferenceBatch,
    answer_logprobs,
    dpo_micro_loss,
)

__all__ = ["DPOTrainer"]


def _pair_logprobs(options: DPOOptions, model, batch: dict) -> jnp.ndarray:
    """[N, 2] sequence log-probs of the chosen (0) and rejected (1) answers of `batch`
    (`input_ids`, `attention_mask`, `loss_mask` [N, 2, L]), one forward over both."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, k, length = ids.shape
    flat = (n * k, length)
    logits, _ = model(ids.reshape(flat), mask.reshape(flat))
    seq = answer_logprobs(logits.astype(jnp.float32), ids.reshape(flat),
                          batch["loss_mask"].reshape(flat), average=options.average)
    return seq.reshape(n, k)


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(spec, params, frozen, batch):
    return _pair_logprobs(spec.options, spec.mdef.merge(params, frozen), batch)


class DPOTrainer(DPOEvalMixin, SFTTrainer):
    """DPO with `config.dpo`: `DPOTrainer(config, run_dir=..., model_name_or_path=None,
    ctx=None)` (see `SupervisedTrainer`); the policy starts from `model_name_or_path` (a
    pipeline passes `<run>/sft/final`), else `model.actor_model_name_or_path`, else a fresh
    `model.actor_config` drawn with the run's seed."""

    step = "dpo"
    loop_class = DPOLoop

    def options(self) -> DPOOptions:
        return DPOOptions.from_config(self.section)

    def batch_arrays(self, batch: PreferenceBatch) -> dict[str, np.ndarray]:
        arrays = {
            "input_ids": np.stack([batch.chosen_input_ids, batch.rejected_input_ids], 1),
            "attention_mask": np.stack([batch.chosen_attention_mask,
                                        batch.rejected_attention_mask], 1),
            "loss_mask": np.stack([batch.chosen_loss_mask, batch.rejected_loss_mask], 1),
        }  # [N, 2, L]
        if batch.has_reference:
            arrays["ref_logprobs"] = np.stack([batch.ref_chosen_logprobs,
                                               batch.ref_rejected_logprobs], 1)  # [N, 2]
        return arrays

    @staticmethod
    def normalizer(spec, batch):
        ids = batch["input_ids"]  # [A, M, 2, L]
        return jnp.asarray(ids.shape[0] * ids.shape[1], jnp.float32)  # pairs in the step

    @staticmethod
    def loss(spec, model, micro_batch, normalizer):
        seq = _pair_logprobs(spec.options, model, micro_batch)  # [M, 2]
        ref = micro_batch["ref_logprobs"].astype(jnp.float32)
        return dpo_micro_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], spec.options,
                              normalizer)

    # -- shared.dpo_step.DPOBackend -----------------------------------------------------
    def sequence_logprobs(self, batch: PreferenceBatch) -> tuple[np.ndarray, np.ndarray]:
        arrays = sharding.shard_batch(self.batch_arrays(batch), self.ctx.mesh)
        arrays.pop("ref_logprobs", None)
        seq = to_host(_sequence_logprobs(self.spec, self.state.params, self.state.frozen,
                                         arrays))
        return seq[:, 0], seq[:, 1]
