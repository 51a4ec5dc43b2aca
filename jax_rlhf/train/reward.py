"""Step 2: reward-model training on comparisons.

The model is a `ValueHeadModel` (per-token scalar head, saved as HF
`*ForSequenceClassification`). Losses (`reward.loss`), all from `shared`:

- `bradley_terry`: on end scores, the value at each sequence's last real token, with the
  optional `reward.margin`;
- `dschat`: DeepSpeed-Chat's token-span loss on the per-token values (`dschat_pairwise_loss`,
  `data.num_padding_at_beginning`);
- `kway`: InstructGPT's K-way ranking loss on the end scores of every ranked response.

Each micro-batch's mean loss is weighted by its share of the optimiser batch's comparisons,
so accumulation never changes the gradient. Metrics: loss, accuracy, chosen_score,
rejected_score (for K-way: best and worst valid response), lr; eval adds `eval_` to the last
three. The model is initialised from `model_name_or_path`, else
`ModelConfig.reward_model_source` (`model.critic_model_name_or_path`, a from-scratch
`model.critic_config`, or the actor's base model `model.actor_model_name_or_path` with a
fresh head; never the SFT model).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import shared
from jax_rlhf.train.common import build_model, compute_dtype
from jax_rlhf.train.supervised import SupervisedTrainer
from shared.data import PairwiseBatch, RankingBatch


@dataclasses.dataclass(frozen=True)
class RewardOptions:
    """The static settings of the reward losses."""

    loss: str
    margin: float | None
    pad_token_id: int
    num_padding_at_beginning: int


def end_scores(values: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """`[..., L]` per-token values -> `[...]` values at the last real token of each row."""
    length = attention_mask.shape[-1]
    last = length - 1 - jnp.argmax(jnp.flip(attention_mask, axis=-1) > 0, axis=-1)
    return jnp.take_along_axis(values, last[..., None], axis=-1)[..., 0]


class RewardTrainer(SupervisedTrainer):
    """Reward-model training with `config.reward`: `RewardTrainer(config, run_dir=...,
    model_name_or_path=None, ctx=None)` (see `SupervisedTrainer`)."""

    step = "reward"

    def __init__(self, config, *, run_dir, model_name_or_path=None, ctx=None):
        super().__init__(config, run_dir=run_dir, model_name_or_path=model_name_or_path,
                         ctx=ctx)
        if isinstance(self.data.train, RankingBatch) and self.spec.options.loss != "kway":
            raise ValueError(
                f"reward.loss={self.spec.options.loss!r} needs comparisons (pairs); the data "
                "has rankings of more than two responses: use reward.loss: kway"
            )

    def build_model(self, path, hf_config):
        cfg = self.config
        return build_model("value_head", path=path, hf_config=hf_config, seed=cfg.seed + 1,
                           dtype=compute_dtype(cfg))

    def options(self) -> RewardOptions:
        cfg = self.config
        return RewardOptions(cfg.reward.loss, cfg.reward.margin,
                             int(self.ctx.tokenizer.pad_token_id),
                             cfg.data.num_padding_at_beginning)

    # -- batches -----------------------------------------------------------------------------
    def batch_arrays(self, batch) -> dict[str, np.ndarray]:
        if isinstance(batch, PairwiseBatch):
            ids = np.stack([batch.chosen_input_ids, batch.rejected_input_ids], axis=1)
            mask = np.stack([batch.chosen_attention_mask, batch.rejected_attention_mask], axis=1)
            num_valid = np.full((len(batch),), 2, np.int32)
        else:
            ids, mask, num_valid = batch.input_ids, batch.attention_mask, batch.num_valid
        return {"input_ids": ids, "attention_mask": mask, "num_valid": num_valid}  # [N, K, L]

    @staticmethod
    def _values(model, batch) -> jnp.ndarray:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n, k, length = ids.shape
        values, _ = model(ids.reshape(n * k, length), mask.reshape(n * k, length))
        return values.astype(jnp.float32).reshape(n, k, length)  # [N, K, L]

    @staticmethod
    def _loss_and_stats(options: RewardOptions, model, batch):
        """(loss, correct [N], chosen [N], rejected [N]); the loss is the batch-row mean."""
        values = RewardTrainer._values(model, batch)
        mask = batch["attention_mask"]
        if options.loss == "dschat":
            loss, stats = shared.dschat_pairwise_loss(
                values[:, 0], values[:, 1], batch["input_ids"][:, 0], batch["input_ids"][:, 1],
                pad_token_id=options.pad_token_id,
                num_padding_at_beginning=options.num_padding_at_beginning,
            )
            chosen, rejected = stats["chosen_end_scores"], stats["rejected_end_scores"]
            return loss, chosen > rejected, chosen, rejected
        scores = end_scores(values, mask)  # [N, K]
        if options.loss == "kway":
            loss, _ = shared.kway_ranking_loss(scores, num_valid=batch["num_valid"])
            worst = jnp.take_along_axis(scores, batch["num_valid"][:, None] - 1, axis=-1)[:, 0]
            correct = jnp.all(
                (scores[:, :1] > scores[:, 1:])
                | (jnp.arange(1, scores.shape[1])[None, :] >= batch["num_valid"][:, None]),
                axis=-1,
            )
            return loss, correct, scores[:, 0], worst
        loss, _ = shared.bradley_terry_loss(scores[:, 0], scores[:, 1], margin=options.margin)
        return loss, scores[:, 0] > scores[:, 1], scores[:, 0], scores[:, 1]

    # -- SupervisedTrainer hooks ----------------------------------------------------------
    @staticmethod
    def normalizer(spec, batch):
        return jnp.asarray(batch["num_valid"].size, jnp.float32)  # comparisons in the step

    @staticmethod
    def loss(spec, model, micro_batch, normalizer):
        loss, correct, chosen, rejected = RewardTrainer._loss_and_stats(
            spec.options, model, micro_batch
        )
        share = chosen.shape[0] / normalizer
        loss = loss * share
        return loss, {
            "loss": loss,
            "accuracy": jnp.mean(correct.astype(jnp.float32)) * share,
            "chosen_score": jnp.mean(chosen) * share,
            "rejected_score": jnp.mean(rejected) * share,
        }

    @staticmethod
    def eval_batch(spec, model, batch):
        _, correct, chosen, rejected = RewardTrainer._loss_and_stats(spec.options, model, batch)
        valid = batch["row_valid"]
        rows = jnp.sum(valid)
        return {
            "pairs": rows,
            "correct": jnp.sum(correct * valid),
            "chosen_sum": jnp.sum(chosen * valid),
            "chosen_count": rows,
            "rejected_sum": jnp.sum(rejected * valid),
            "rejected_count": rows,
        }
