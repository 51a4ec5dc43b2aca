"""The training loop of the two supervised steps (SFT and reward model).

Each optimiser step takes `per_device_train_batch_size * (data * fsdp) *
gradient_accumulation_steps` examples from a resumable `shared.data.BatchIterator` (seeded
with the run's seed, shuffled, last partial batch dropped), runs one jitted `train_step`,
logs, evaluates every `eval_interval` steps and checkpoints every `logging.save_interval`
steps and at the end. Subclasses define the model, the arrays of a batch, the loss and the
eval sums.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import numpy as np

from jax_rlhf import sharding
from jax_rlhf.checkpoint import Checkpointer
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef
from jax_rlhf.train.common import (
    RunContext,
    configure_module,
    export_hf,
    host_metrics,
    model_meta,
    pad_rows,
    trainable_filter,
)
from jax_rlhf.train.step import (
    abstract_train_state,
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    jit_step,
    stack_micro_batches,
)
from shared.data import BatchIterator, build_step_data
from shared.runlog import progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static a supervised step depends on (hashable: a `jit` static argument, so
    trainers built from equal configs share their compiled steps)."""

    trainer: type
    """The `SupervisedTrainer` subclass whose static `normalizer`, `loss`, `eval_sums` run."""
    mdef: ModelDef
    optim: Any
    """The `OptimizerConfig`."""
    total_steps: int
    lora_learning_rate: float | None
    options: Any
    """The trainer's own hashable settings (loss mode, margin, pad id, ...)."""

    def optimizer(self, params):
        return make_optimizer(self.optim, params, total_steps=self.total_steps,
                              lora_learning_rate=self.lora_learning_rate)


def _train_step(spec: StepSpec, state, batch):
    """One optimiser step of `spec.trainer`'s loss on `[A, M, ...]` micro-batches."""
    opt = spec.optimizer(state.params)
    normalizer = spec.trainer.normalizer(spec, batch)

    def loss_fn(params, micro_batch):
        model = spec.mdef.merge(params, state.frozen)
        return spec.trainer.loss(spec, model, micro_batch, normalizer)

    grads, aux = accumulate_gradients(loss_fn, state.params, batch)
    lr = opt.schedule(state.step)
    state, grad_norm = apply_gradients(state, grads, opt.tx)
    return state, {**aux, "lr": lr, "grad_norm": grad_norm}


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(spec: StepSpec, params, frozen, batch):
    return spec.trainer.eval_sums(spec, spec.mdef.merge(params, frozen), batch)


class SupervisedTrainer:
    """Base of `SFTTrainer` and `RewardTrainer`."""

    step_name: str = ""
    """Run-directory step and metrics name ("sft" / "reward")."""

    def __init__(self, ctx: RunContext, model, *, section: Any, options: Any = None):
        """`model`: the freshly built or loaded NNX model; `section`: `cfg.sft` / `cfg.reward`;
        `options`: hashable settings the static loss functions read (`spec.options`)."""
        cfg = ctx.config
        self.ctx, self.section = ctx, section
        self.module_cfg = section.model
        adapted = configure_module(model, self.module_cfg, seed=cfg.seed)
        self.mdef, params, frozen = ModelDef.split(
            model, trainable=trainable_filter(self.module_cfg, adapted)
        )
        self.data = build_step_data(cfg.data, ctx.tokenizer, self.step_name)
        self.accum = section.gradient_accumulation_steps
        self.micro_batch = section.per_device_train_batch_size * ctx.dp
        self.iterator = BatchIterator(
            self.data.train,
            self.micro_batch * self.accum,
            seed=cfg.seed,
            shuffle=True,
            drop_last=True,
            name=f"{self.step_name}/train",
        )
        total = section.num_train_epochs * self.iterator.batches_per_epoch
        self.total_steps = min(total, section.max_steps) if section.max_steps else total
        self.spec = StepSpec(
            type(self), self.mdef, section.optim, self.total_steps,
            self.module_cfg.lora.learning_rate, options,
        )
        self.state = init_train_state(params, frozen, self.spec.optimizer(params).tx, ctx.mesh)
        self._train_step = jit_step(
            _train_step, ctx.mesh, sharding.tree_shardings(self.state), static_spec=True
        )
        self.step = 0

    # -- subclass interface (static: they run inside jit with the spec) ----------------------
    def batch_arrays(self, batch) -> dict[str, np.ndarray]:
        """The numpy fields a step needs, first axis = examples."""
        raise NotImplementedError

    @staticmethod
    def normalizer(spec: StepSpec, batch: dict) -> jax.Array:
        """The global count the loss divides by, from the whole `[A, M, ...]` batch."""
        raise NotImplementedError

    @staticmethod
    def loss(spec: StepSpec, model, micro_batch: dict, normalizer) -> tuple[jax.Array, dict]:
        """`(loss, additive metrics)` of one micro-batch."""
        raise NotImplementedError

    @staticmethod
    def eval_sums(spec: StepSpec, model, batch: dict) -> dict:
        """Sums over the eval rows of one batch (`batch["row_valid"]` marks real rows)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        raise NotImplementedError

    # -- loop -------------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step on a host batch of `micro_batch * accum` examples."""
        arrays = stack_micro_batches(self.batch_arrays(batch), self.accum)
        arrays = sharding.shard_batch(arrays, self.ctx.mesh, axis=1)
        self.state, metrics = self._train_step(self.spec, self.state, arrays)
        self.step += 1
        return host_metrics(metrics)

    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the whole eval split (empty without one)."""
        data = self.data.eval
        if data is None or len(data) == 0:
            return {}
        size = self.section.per_device_eval_batch_size * self.ctx.dp
        totals: dict[str, float] = {}
        for start in range(0, len(data), size):
            arrays, valid = pad_rows(self.batch_arrays(data.take(slice(start, start + size))), size)
            arrays = sharding.shard_batch({**arrays, "row_valid": valid}, self.ctx.mesh)
            sums = host_metrics(
                _eval_step(self.spec, self.state.params, self.state.frozen, arrays)
            )
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        return self.eval_metrics(totals)

    def checkpoint_meta(self) -> dict:
        return {
            "step": self.step,
            "iterator": self.iterator.state_dict(),
            "models": {"model": model_meta(self.mdef, self.module_cfg)},
        }

    def save(self, checkpointer: Checkpointer) -> None:
        checkpointer.save(self.step, {"model": self.state}, self.checkpoint_meta())

    def restore(self, checkpointer: Checkpointer) -> bool:
        """Loads the latest checkpoint if there is one; returns whether it did."""
        if checkpointer.latest_step() is None:
            return False
        restored, meta = checkpointer.restore({"model": abstract_train_state(self.state)})
        self.state = restored["model"]
        self.step = int(meta["step"])
        self.iterator.load_state_dict(meta["iterator"])
        return True

    def fit(self, *, resume: bool = False) -> dict[str, float]:
        """Trains to `total_steps` (continuing from the last checkpoint with `resume`) and
        returns the final eval metrics."""
        ctx, cfg = self.ctx, self.ctx.config
        log_cfg = cfg.logging
        checkpointer = Checkpointer(
            ctx.step_dir(self.step_name) / "checkpoints",
            keep=log_cfg.keep_checkpoints,
            async_save=cfg.engine.jax.async_checkpointing,
        )
        if resume and self.restore(checkpointer):
            logger.info("%s: resumed at step %d of %d", self.step_name, self.step,
                        self.total_steps)
        bar = progress(self.total_steps, desc=self.step_name, initial=self.step,
                       enabled=log_cfg.progress_bar and ctx.is_main)
        start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                metrics = self.train_step(self.iterator.next_batch())
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.step % log_cfg.log_interval == 0 or self.step == self.total_steps:
                    ctx.logger.log(self.step_name, self.step, metrics)
                interval = self.section.eval_interval
                if interval and self.step % interval == 0 and self.step < self.total_steps:
                    ctx.logger.log(self.step_name, self.step, self.evaluate())
                if log_cfg.save_interval and self.step % log_cfg.save_interval == 0:
                    self.save(checkpointer)
            self.save(checkpointer)
        finally:
            bar.close()
            checkpointer.close()
        self.train_time = time.perf_counter() - start
        final = self.evaluate()
        if final:
            ctx.logger.log(self.step_name, self.step, final)
        return final

    def final_extras(self) -> dict:
        """Summary entries of the exported final model beyond the eval metrics (SFT: its
        held-out metric)."""
        return {}

    def run(self, *, resume: bool = False) -> dict:
        """Trains, evaluates, exports `<run>/<step_name>/final/` and returns the summary
        entry."""
        ctx = self.ctx
        start = time.perf_counter()
        eval_metrics = self.fit(resume=resume)
        final_dir = export_hf(
            self.mdef, self.state.params, self.state.frozen,
            ctx.step_dir(self.step_name) / "final", ctx.tokenizer,
        )
        return {
            **eval_metrics,
            **self.final_extras(),
            "steps": self.step,
            "final_model": str(final_dir),
            "timings": {"train": self.train_time, "total": time.perf_counter() - start},
        }
