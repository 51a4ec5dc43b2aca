"""What steps 1 and 2 need from JAX: the backend of `shared.supervised_loop`.

The loop (iterator, cadences, checkpoints, resume, summary) is
`shared.supervised_loop.SupervisedLoop`; this module is the JAX side of its protocol: one
jitted optimiser step over `[A, M, ...]` stacked micro-batches (`A` =
`gradient_accumulation_steps`, `M` = `per_device_train_batch_size * (data * fsdp)`), the
jitted eval sums of a chunk, orbax checkpoints and the HF export. Subclasses define the
model, the arrays of a batch, the loss and the eval sums as static functions of a
`StepSpec`, so trainers built from equal configs share their compiled steps.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from jax_rlhf import sharding
from jax_rlhf.checkpoint import DirectoryCheckpointer
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef
from jax_rlhf.train.common import (
    RunContext,
    configure_module,
    export_hf,
    host_metrics,
    model_meta,
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
from shared.supervised_loop import LoopTrainer, SupervisedLoop, model_source


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static a supervised step depends on (hashable: a `jit` static argument, so
    trainers built from equal configs share their compiled steps)."""

    trainer: type
    """The `SupervisedTrainer` subclass whose static `normalizer`, `loss`, `eval_batch` run."""
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
    return spec.trainer.eval_batch(spec, spec.mdef.merge(params, frozen), batch)


class SupervisedTrainer(LoopTrainer):
    """Base of `SFTTrainer` and `RewardTrainer`.

    Args:
      config: the whole run config; the step's section is `config.sft` / `config.reward`.
      run_dir: the run directory; this step writes `<run_dir>/<step>/`.
      model_name_or_path: an HF directory to start from; default
        `shared.supervised_loop.model_source` (the config's directory, or a fresh model from
        its `*_config` drawn with the run's seed).
      ctx: an existing `RunContext` of this config and run directory (a pipeline shares
        one); default: `RunContext.open(config, run_dir)`.

    Attributes:
      state: the `TrainState` (parameters, optimiser state, step); `mdef`: the model's
      structure; `iterator`, `total_steps`, `loop`: the `SupervisedLoop`'s.
    """

    step: ClassVar[str]
    backend: ClassVar[str] = "jax"
    loop_class: ClassVar[type[SupervisedLoop]] = SupervisedLoop

    def __init__(self, config: Any, *, run_dir: str | Path,
                 model_name_or_path: str | Path | None = None, ctx: RunContext | None = None):
        path, fresh = model_source(config, self.step)
        if model_name_or_path is not None:
            path, fresh = str(model_name_or_path), None
        self.model_name_or_path = path  # the model card's base model
        if ctx is None:
            ctx = RunContext.open(config, run_dir, fallback_tokenizer=path)
        elif ctx.config != config or Path(ctx.run_dir).resolve() != Path(run_dir).resolve():
            raise ValueError(f"ctx is the context of another run ({ctx.run_dir}); pass the "
                             "config and run_dir it was created with")
        self.ctx, self.config = ctx, config
        self.section = getattr(config, self.step)
        self.module_cfg = self.section.model
        self.loop = self.loop_class(
            config, self.step, data=self.loop_class.build_data(config, ctx.tokenizer, self.step),
            run_dir=ctx.run_dir, run_logger=ctx.logger, data_parallel_size=ctx.dp,
            is_main=ctx.is_main, barrier=ctx.barrier)
        model = self.build_model(path, fresh)
        adapted = configure_module(model, self.module_cfg, seed=config.seed)
        self.mdef, params, frozen = ModelDef.split(
            model, trainable=trainable_filter(self.module_cfg, adapted)
        )
        self.accum = self.section.gradient_accumulation_steps
        self.spec = StepSpec(
            type(self), self.mdef, self.section.optim, self.total_steps,
            self.module_cfg.lora.learning_rate, self.options(),
        )
        self.state = init_train_state(params, frozen, self.spec.optimizer(params).tx, ctx.mesh)
        self._train_step = jit_step(
            _train_step, ctx.mesh, sharding.tree_shardings(self.state), static_spec=True
        )
        self.saves_in_background = config.engine.jax.async_checkpointing
        self._checkpointer: DirectoryCheckpointer | None = None

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train, evaluate, export `<run>/<step>/final`; returns the `summary.json` entry
        (`SupervisedLoop.run`)."""
        try:
            return self.loop.run(self, resume=resume)
        finally:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the whole eval split (empty without one)."""
        return self.loop.evaluate(self)

    # -- subclass interface -------------------------------------------------------------------
    def build_model(self, path: str | None, hf_config: dict | None):
        """The NNX model loaded from `path`, or fresh from `hf_config`."""
        raise NotImplementedError

    def options(self) -> Any:
        """Hashable settings the static functions read (`spec.options`)."""
        return None

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
    def eval_batch(spec: StepSpec, model, batch: dict) -> dict:
        """Sums over the eval rows of one chunk (`batch["row_valid"]` marks the counted
        rows), keyed as `shared.supervised_loop.eval_metrics` reads them."""
        raise NotImplementedError

    # -- the loop's protocol ------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step on a host batch of `micro_batch * accum` examples."""
        arrays = stack_micro_batches(self.batch_arrays(batch), self.accum)
        arrays = sharding.shard_batch(arrays, self.ctx.mesh, axis=1)
        self.state, metrics = self._train_step(self.spec, self.state, arrays)
        return host_metrics(metrics)

    def eval_sums(self, batch, valid: np.ndarray) -> dict[str, float]:
        arrays = {**self.batch_arrays(batch), "row_valid": valid.astype(np.float32)}
        arrays = sharding.shard_batch(arrays, self.ctx.mesh)
        return host_metrics(_eval_step(self.spec, self.state.params, self.state.frozen, arrays))

    def _checkpoints(self) -> DirectoryCheckpointer:
        if self._checkpointer is None:
            self._checkpointer = DirectoryCheckpointer(async_save=self.saves_in_background)
        return self._checkpointer

    def save(self, path: Path, loop_state: dict[str, Any]) -> None:
        meta = {"loop": loop_state, "models": {"model": model_meta(self.mdef, self.module_cfg)}}
        self._checkpoints().save(path, {"model": self.state}, meta)

    def wait_until_saved(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def restore(self, path: Path) -> dict[str, Any]:
        abstract = {"model": abstract_train_state(self.state)}
        restored, meta = self._checkpoints().restore(path, abstract)
        self.state = restored["model"]
        return meta["loop"]

    def export(self, directory: Path) -> None:
        export_hf(self.mdef, self.state.params, self.state.frozen, directory,
                  self.ctx.tokenizer)

    def heldout_metrics(self) -> dict[str, float]:
        return {}
