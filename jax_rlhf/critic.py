"""`JaxCritic`: the `shared.serving.critic_handler.CriticTrainer` of `rlhf serve critic
--backend jax`. It builds the critic as `jax_rlhf.train.ppo.PPOTrainer` does (value-head
model, `ppo.critic` LoRA/remat, `ppo.critic_optim` over the run's critic steps) and trains it
with `jax_rlhf.train.engine.critic_step`, the critic half of the in-process `ppo_step`, so a
served critic is the in-process one in another process (docs/serving.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_rlhf import sharding
from jax_rlhf.checkpoint import DirectoryCheckpointer
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef
from jax_rlhf.train import engine
from jax_rlhf.train.common import (
    build_model,
    compute_dtype,
    configure_module,
    export_hf,
    host_metrics,
    load_tokenizer,
    trainable_filter,
)
from jax_rlhf.train.step import abstract_train_state, init_train_state
from shared.serving.critic_handler import CRITIC_FIELDS, critic_total_steps
from shared.serving.protocol import tokenizer_fingerprint

__all__ = ["JaxCritic"]

ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask")


@functools.partial(jax.jit, static_argnums=0)
def _values(mdef: ModelDef, params, frozen, rollout):
    """What `engine.score` computes as ``values``."""
    values, _, _ = engine._response_forward(  # noqa: SLF001 (the one forward of scoring)
        mdef.merge(params, frozen), *(rollout[k] for k in ROLLOUT_FIELDS))
    return values.astype(jnp.float32)


class JaxCritic:
    """The critic of a PPO run of ``config`` on ``world_size`` actor processes, loaded from
    ``model_dir`` (None: fresh from ``model.critic_config``)."""

    def __init__(self, config: Any, model_dir: str | None, *, world_size: int = 1):
        ppo = config.ppo
        self.config = config
        self.tokenizer = load_tokenizer(config, model_dir)
        self.total_steps = critic_total_steps(config, self.tokenizer, world_size=world_size)
        self.mesh = sharding.make_mesh(config.engine.jax.mesh)
        critic = build_model("value_head", path=model_dir, hf_config=config.model.critic_config,
                             seed=config.seed + 1, dtype=compute_dtype(config))
        adapted = configure_module(critic, ppo.critic, seed=config.seed + 1,
                                   lora_seed=config.seed)
        self.mdef, params, frozen = ModelDef.split(
            critic, trainable=trainable_filter(ppo.critic, adapted))
        self.optimizer = make_optimizer(ppo.critic_optim, params, total_steps=self.total_steps,
                                        lora_learning_rate=ppo.critic.lora.learning_rate)
        self.state = init_train_state(params, frozen, self.optimizer.tx, self.mesh)
        state_sh = sharding.tree_shardings(self.state)
        mdef, conventions, optimizer = self.mdef, ppo.conventions, self.optimizer

        def step(state, batch):
            return engine.critic_step(mdef, conventions, optimizer, state, batch)

        self._step = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(
            self.mesh, axis=1)), out_shardings=(state_sh, sharding.replicated(self.mesh)),
            donate_argnums=0)
        self.identity = {"role": "critic", "backend": "jax", "model": str(model_dir),
                         "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}

    def values(self, rollout: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = sharding.shard_batch({k: np.asarray(rollout[k]).astype(np.int32)
                                      for k in ROLLOUT_FIELDS}, self.mesh)
        return np.asarray(jax.device_get(_values(self.mdef, self.state.params,
                                                 self.state.frozen, batch)))

    def train(self, micro_batches: list[dict[str, np.ndarray]],
              normalizers: list[float]) -> dict[str, float]:
        # the layout of PPOTrainer._stacked: [A, M, ...], each micro-batch's normaliser
        # broadcast over its rows
        out = {k: np.stack([m[k] for m in micro_batches]) for k in CRITIC_FIELDS}
        rows = out["response"].shape[1]
        out["normalizer"] = np.repeat(np.asarray(normalizers, np.float32)[:, None], rows, 1)
        self.state, aux = self._step(self.state,
                                     sharding.shard_batch(out, self.mesh, axis=1))
        return host_metrics(aux)

    def save(self, path: Path) -> None:
        checkpointer = DirectoryCheckpointer(async_save=False)
        checkpointer.save(path, {"critic": self.state}, {"total_steps": self.total_steps})
        checkpointer.close()

    def load(self, path: Path) -> None:
        checkpointer = DirectoryCheckpointer(async_save=False)
        tree, _ = checkpointer.restore(path, {"critic": abstract_train_state(self.state)})
        checkpointer.close()
        self.state = tree["critic"]

    def export(self, path: Path) -> None:
        export_hf(self.mdef, self.state.params, self.state.frozen, path, self.tokenizer)
