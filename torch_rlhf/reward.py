"""Step 2: reward-model training on comparisons (DS-Chat step 2).

The reward model is a :class:`~torch_rlhf.models.ValueModel` (sequence classification,
``num_labels=1``) read at every token; a sequence's score is the value at its last real
token. Losses come from ``shared``:

- ``bradley_terry``: ``-log sigmoid(s_chosen - s_rejected - margin)`` on end scores;
- ``dschat``: DeepSpeed-Chat's per-token loss over the span where the pair differs;
- ``kway``: InstructGPT's K-way ranking loss (a pair is a ranking of two).

Each loss is a mean over the rows (pairs or rankings) of a micro-batch; it is rescaled
by ``rows / global rows`` so that the optimiser step sees the mean over the global batch.
Metrics: loss, accuracy, chosen_score, rejected_score, lr; eval_accuracy,
eval_chosen_score, eval_rejected_score.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared.data import PairwiseBatch, RankingBatch
from shared.reward_losses import bradley_terry_loss, dschat_pairwise_loss, kway_ranking_loss
from shared.supervised_loop import reward_ratios
from torch_rlhf.models import gather_end_values
from torch_rlhf.supervised import SupervisedTrainer

__all__ = ["RewardTrainer", "reward_loss"]


_SUM_KEYS = ("correct", "pairs", "chosen_sum", "chosen_count", "rejected_sum", "rejected_count",
             "rows")


def _t(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).long().to(device)


def reward_loss(model, batch: PairwiseBatch | RankingBatch, *, loss: str,
                margin: float | None = None, pad_token_id: int = 0,
                num_padding_at_beginning: int = 0,
                rows: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over ``batch`` (or its ``rows``) and additive statistics.

    ``model`` (a ValueModel or an engine around one) runs on every row, so ZeRO-3 ranks
    stay in step even when none of their rows count.

    Returns:
      loss: scalar mean over the counted rows (0 when none count).
      sums: correct / pairs (ranking accuracy), chosen_sum / chosen_count,
        rejected_sum / rejected_count, rows (zeros when no row counts).
    """
    device = next(iter(model.parameters())).device
    if isinstance(batch, PairwiseBatch):
        if loss not in ("bradley_terry", "dschat", "kway"):
            raise ValueError(f"reward.loss: {loss!r} is invalid; allowed: bradley_terry, "
                             "dschat, kway")
        n = len(batch)
        ids = _t(np.concatenate([batch.chosen_input_ids, batch.rejected_input_ids]), device)
        mask = _t(np.concatenate([batch.chosen_attention_mask,
                                  batch.rejected_attention_mask]), device)
        values = model(ids, mask).float()  # [2n, L]
        keep = slice(None) if rows is None else torch.from_numpy(rows).to(device)
        chosen_values, rejected_values = values[:n][keep], values[n:][keep]
        scores = gather_end_values(values, mask, prompt_length=1)
        chosen, rejected = scores[:n][keep], scores[n:][keep]
        counted = int(chosen.shape[0])
        if counted == 0:
            return values.sum() * 0.0, dict.fromkeys(_SUM_KEYS, 0.0)
        if loss == "dschat":
            mean, stats = dschat_pairwise_loss(
                chosen_values, rejected_values, ids[:n][keep], ids[n:][keep],
                pad_token_id=pad_token_id, num_padding_at_beginning=num_padding_at_beginning)
            chosen, rejected = stats["chosen_end_scores"], stats["rejected_end_scores"]
            correct = float(stats["accuracy"]) * counted
        elif loss == "bradley_terry":
            mean, stats = bradley_terry_loss(chosen, rejected, margin=margin)
            correct = float(stats["accuracy"]) * counted
        else:
            mean, stats = kway_ranking_loss(torch.stack([chosen, rejected], 1))
            correct = float(stats["accuracy"]) * counted
        chosen_d, rejected_d = chosen.detach(), rejected.detach()
        return mean, {"correct": correct, "pairs": float(counted),
                      "chosen_sum": float(chosen_d.sum()), "chosen_count": float(counted),
                      "rejected_sum": float(rejected_d.sum()),
                      "rejected_count": float(counted), "rows": float(counted)}
    if loss != "kway":
        raise ValueError(f"reward.loss: {loss!r} needs pairwise comparisons, but the data has "
                         "rankings of more than two responses; use reward.loss: kway")
    n, k, length = batch.input_ids.shape
    ids = _t(batch.input_ids.reshape(n * k, length), device)
    mask = _t(batch.attention_mask.reshape(n * k, length), device)
    values = model(ids, mask).float()
    scores = gather_end_values(values, mask, prompt_length=1).reshape(n, k)
    num_valid = _t(batch.num_valid, device)
    if rows is not None:
        keep = torch.from_numpy(rows).to(device)
        scores, num_valid = scores[keep], num_valid[keep]
    if scores.shape[0] == 0:
        return values.sum() * 0.0, dict.fromkeys(_SUM_KEYS, 0.0)
    mean, stats = kway_ranking_loss(scores, num_valid=num_valid)
    below = torch.arange(k, device=device)[None, :] < num_valid[:, None]
    others = below.clone()
    others[:, 0] = False
    detached = scores.detach()
    return mean, {"correct": float(stats["accuracy"] * stats["num_pairs"]),
                  "pairs": float(stats["num_pairs"]), "chosen_sum": float(detached[:, 0].sum()),
                  "chosen_count": float(scores.shape[0]),
                  "rejected_sum": float((detached * others).sum()),
                  "rejected_count": float(others.sum()), "rows": float(scores.shape[0])}


class RewardTrainer(SupervisedTrainer):
    """Reward-model training with ``config.reward``: ``RewardTrainer(config, run_dir=...,
    model_name_or_path=None)`` (see :class:`SupervisedTrainer`).

    Starts from ``model.critic_model_name_or_path``, else a fresh ``critic_config`` model,
    else the actor's base model ``model.actor_model_name_or_path`` with a fresh value head
    (``ModelConfig.reward_model_source``); the final model is an
    ``AutoModelForSequenceClassification`` directory.
    """

    step = "reward"
    kind = "value"

    def normalizer(self, batch) -> float:
        return float(len(batch))

    def _loss(self, batch, rows: np.ndarray | None = None):
        return reward_loss(self.engine, batch, loss=self.section.loss, margin=self.section.margin,
                           pad_token_id=self.tokenizer.pad_token_id,
                           num_padding_at_beginning=self.config.data.num_padding_at_beginning,
                           rows=rows)

    def micro_step(self, batch, normalizer: float):
        mean, sums = self._loss(batch)
        sums.pop("rows", None)
        return mean * (len(batch) / normalizer), sums

    def step_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"], **reward_ratios(sums)}

    def local_eval_sums(self, batch, valid: np.ndarray) -> dict[str, float]:
        _, sums = self._loss(batch, rows=np.flatnonzero(valid))
        return sums
