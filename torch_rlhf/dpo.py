"""Offline DPO (``rlhf dpo``) on DeepSpeed: the torch side of ``shared.dpo_step``.

Everything but the forward passes is shared: the loop, the data (the reward step's
comparisons as ``PreferenceBatch``), the reference log-probs (computed once by the starting
policy, kept in the checkpoints), the loss (``shared.dpo.dpo_loss`` via
``shared.dpo_step.dpo_micro_loss``, divided by the step's global pair count) and the metrics.
This trainer is the SFT trainer (same model, export and held-out metric) with a DPO micro-step.

Example::

    from shared.config import load_config
    from torch_rlhf.deepspeed_config import init_distributed
    from torch_rlhf.dpo import DPOTrainer

    init_distributed()
    entry = DPOTrainer(load_config("configs/demo-dpo.yaml"), run_dir="runs/mine",
                       model_name_or_path="runs/mine/sft/final").run()
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared.dpo_step import (
    DPOEvalMixin,
    DPOLoop,
    DPOOptions,
    PreferenceBatch,
    answer_logprobs,
    dpo_metrics,
    dpo_micro_loss,
)
from torch_rlhf.distributed import all_gather_rows, rank_rows
from torch_rlhf.sft import SFTTrainer

__all__ = ["DPOTrainer"]


def _long(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).long().to(device)


class DPOTrainer(DPOEvalMixin, SFTTrainer):
    """DPO with ``config.dpo``: ``DPOTrainer(config, run_dir=..., model_name_or_path=None)``
    (see :class:`~torch_rlhf.supervised.SupervisedTrainer`); the policy starts from
    ``model_name_or_path`` (a pipeline passes ``<run>/sft/final``), else
    ``model.actor_model_name_or_path``, else a fresh ``model.actor_config``."""

    step = "dpo"
    kind = "causal_lm"
    loop_class = DPOLoop

    @property
    def options(self) -> DPOOptions:
        return DPOOptions.from_config(self.section)

    def _pair_logprobs(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[n] chosen and [n] rejected sequence log-probs of this rank's rows (one forward
        over both answers)."""
        device = self.engine.device
        n = len(batch)
        ids = _long(np.concatenate([batch.chosen_input_ids, batch.rejected_input_ids]), device)
        mask = _long(np.concatenate([batch.chosen_attention_mask,
                                     batch.rejected_attention_mask]), device)
        loss_mask = _long(np.concatenate([batch.chosen_loss_mask, batch.rejected_loss_mask]),
                          device)
        logits = self._logits(ids, mask)  # fp32
        seq = answer_logprobs(logits, ids, loss_mask, average=self.options.average)
        return seq[:n], seq[n:]

    # -- SupervisedTrainer hooks ----------------------------------------------------------
    def normalizer(self, batch: PreferenceBatch) -> float:
        return float(len(batch))  # pairs in the optimiser step

    def micro_step(self, batch: PreferenceBatch, normalizer: float):
        chosen, rejected = self._pair_logprobs(batch)
        device = chosen.device
        ref_chosen = torch.from_numpy(batch.ref_chosen_logprobs).float().to(device)
        ref_rejected = torch.from_numpy(batch.ref_rejected_logprobs).float().to(device)
        loss, stats = dpo_micro_loss(chosen, rejected, ref_chosen, ref_rejected, self.options,
                                     normalizer)
        stats.pop("loss")
        return loss, {key: float(value.detach()) for key, value in stats.items()}

    def step_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        # the sums are already global means (dpo_micro_loss weights by pairs / normaliser)
        return {**dpo_metrics({**sums, "pairs": 1.0}), "grad_norm": self.last_grad_norm}

    # -- shared.dpo_step.DPOBackend -------------------------------------------------------
    def sequence_logprobs(self, batch: PreferenceBatch) -> tuple[np.ndarray, np.ndarray]:
        local = rank_rows(len(batch))
        self.engine.eval()
        with torch.no_grad():
            chosen, rejected = self._pair_logprobs(batch.take(local))
            both = all_gather_rows(torch.stack([chosen, rejected], dim=1))  # [N, 2]
        self.engine.train()
        both = both.cpu().numpy()
        return both[:, 0], both[:, 1]
