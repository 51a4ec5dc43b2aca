"""Step 1: supervised fine-tuning of the actor on demonstrations.

Loss: `shared.sft_loss` on `logits[:, :-1]` against `input_ids[:, 1:]`, weighted by the batch's
`loss_mask[:, 1:]` (response tokens, or every real token with `data.train_on_prompt`, as the
data layer builds it), aggregated by `sft.loss_agg_mode` with the global count of the whole
optimiser batch. Eval: token-mean loss over the eval split and its perplexity. The step ends
with the model exported to `<run>/sft/final/` and the held-out metric.

Example (docs/jax.md)::

    from jax_rlhf.train import SFTTrainer
    from shared.config import load_config

    entry = SFTTrainer(load_config("configs/demo.yaml"), run_dir="runs/mine").run()
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import shared
from jax_rlhf.train.common import build_model, compute_dtype, heldout_metrics, load_eval_prompts
from jax_rlhf.train.supervised import SupervisedTrainer


def _labels_mask(batch: dict) -> jnp.ndarray:
    return (batch["loss_mask"][..., 1:] * batch["attention_mask"][..., 1:]).astype(jnp.float32)


class SFTTrainer(SupervisedTrainer):
    """Supervised fine-tuning with `config.sft`: `SFTTrainer(config, run_dir=...,
    model_name_or_path=None, ctx=None)` (see `SupervisedTrainer`); the model starts from
    `model_name_or_path`, else `model.actor_model_name_or_path`, else a fresh
    `model.actor_config` drawn with the run's seed."""

    step = "sft"

    def build_model(self, path, hf_config):
        cfg = self.config
        return build_model("causal_lm", path=path, hf_config=hf_config, seed=cfg.seed,
                           dtype=compute_dtype(cfg))

    def options(self):
        return self.section.loss_agg_mode

    def batch_arrays(self, batch) -> dict[str, np.ndarray]:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "loss_mask": batch.loss_mask,
        }

    @staticmethod
    def normalizer(spec, batch):
        mask = _labels_mask(batch)
        return shared.loss_normalizer(mask.reshape(-1, mask.shape[-1]), mode=spec.options)

    @staticmethod
    def loss(spec, model, micro_batch, normalizer):
        logits, _ = model(micro_batch["input_ids"], micro_batch["attention_mask"])  # [M, L, V]
        mask = _labels_mask(micro_batch)
        loss = shared.sft_loss(
            logits[:, :-1].astype(jnp.float32),
            micro_batch["input_ids"][:, 1:],
            mask,
            agg_mode=spec.options,
            normalizer=normalizer,
        )
        return loss, {"loss": loss, "tokens": jnp.sum(mask)}

    @staticmethod
    def eval_batch(spec, model, batch):
        logits, _ = model(batch["input_ids"], batch["attention_mask"])
        mask = _labels_mask(batch) * batch["row_valid"][:, None]
        nll = -shared.token_logprobs(logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:])
        return {"nll": shared.masked_sum(nll, mask), "tokens": jnp.sum(mask)}

    def heldout_metrics(self) -> dict[str, float]:
        return heldout_metrics(self.ctx, self.mdef, self.state.params, self.state.frozen,
                               load_eval_prompts(self.ctx))
