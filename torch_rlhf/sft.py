"""Step 1: supervised fine-tuning of the policy on demonstrations (DS-Chat step 1).

The loss is ``shared.sft_loss`` on ``logits[:, :-1]`` against ``input_ids[:, 1:]``,
weighted by the data layer's ``loss_mask[:, 1:]`` (response tokens only, or every real
token with ``data.train_on_prompt``, as DeepSpeed-Chat trains), aggregated by
``sft.loss_agg_mode`` over the global count. Eval: token-mean loss and perplexity.

Example (docs/torch.md)::

    from shared.config import load_config
    from torch_rlhf.deepspeed_config import init_distributed
    from torch_rlhf.sft import SFTTrainer

    init_distributed()
    entry = SFTTrainer(load_config("configs/demo.yaml"), run_dir="runs/mine").run()
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared.aggregation import loss_normalizer
from shared.data import SFTBatch
from shared.logprobs import token_logprobs
from shared.sft_loss import sft_loss
from torch_rlhf.evaluation import heldout_metrics
from torch_rlhf.models import causal_lm_logits
from torch_rlhf.supervised import SupervisedTrainer

__all__ = ["SFTTrainer"]


def _tensors(batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.attention_mask).long(),
            torch.from_numpy(batch.loss_mask).float())


class SFTTrainer(SupervisedTrainer):
    """Supervised fine-tuning with ``config.sft``: ``SFTTrainer(config, run_dir=...,
    model_name_or_path=None)`` (see :class:`SupervisedTrainer`). Metrics: loss, lr,
    grad_norm, tokens; eval_loss, eval_perplexity; the held-out ``eval.metric`` of the final
    model goes to the summary."""

    step = "sft"
    kind = "causal_lm"

    def normalizer(self, batch: SFTBatch) -> float:
        return float(loss_normalizer(batch.loss_mask[:, 1:], mode=self.section.loss_agg_mode))

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.engine.device
        # Upcast for the loss, as Hugging Face's causal-LM loss does under bf16 / fp16.
        return causal_lm_logits(self.engine, ids.to(device), mask.to(device)).float()

    def micro_step(self, batch: SFTBatch, normalizer: float):
        ids, mask, loss_mask = _tensors(batch)
        logits = self._logits(ids, mask)
        device = logits.device
        loss = sft_loss(logits[:, :-1], ids[:, 1:].to(device), loss_mask[:, 1:].to(device),
                        agg_mode=self.section.loss_agg_mode, normalizer=normalizer)
        return loss, {"tokens": float(loss_mask[:, 1:].sum())}

    def step_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"], "grad_norm": self.last_grad_norm, "tokens": sums["tokens"]}

    def local_eval_sums(self, batch: SFTBatch, valid: np.ndarray) -> dict[str, float]:
        ids, mask, loss_mask = _tensors(batch)
        logits = self._logits(ids, mask)
        weight = (loss_mask[:, 1:] * torch.from_numpy(valid).float()[:, None]).to(logits.device)
        nll = -token_logprobs(logits[:, :-1], ids[:, 1:].to(logits.device))
        return {"nll": float((nll * weight).sum()), "tokens": float(weight.sum())}

    def heldout_metrics(self) -> dict[str, float]:
        return heldout_metrics(self.engine, self.tokenizer, self.config)
