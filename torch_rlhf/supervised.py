"""What steps 1 and 2 need from DeepSpeed: the backend of ``shared.supervised_loop``.

The loop (iterator, cadences, checkpoints, resume, summary) is
:class:`shared.supervised_loop.SupervisedLoop`; this module is the torch side of its
protocol: the optimiser step, the eval sums of a chunk, checkpoint files, export.

One optimiser step takes a *global* batch of ``per_device_train_batch_size x world_size x
gradient_accumulation_steps`` rows. Micro-batch g is rows ``[g * m * W, (g + 1) * m * W)``
and each rank trains on its contiguous slice of it. The loss of every micro-batch is divided
by the count of the whole global batch (``normaliser``), so the step's gradient is the same
for any micro-batch size, accumulation or number of ranks (see ``torch_rlhf.optim``).

Subclasses (:class:`torch_rlhf.sft.SFTTrainer`, :class:`torch_rlhf.reward.RewardTrainer`)
say how a micro-batch becomes a loss and what a batch's eval statistics are.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.runlog import RunLogger
from shared.supervised_loop import LoopTrainer, SupervisedLoop, model_source
from torch_rlhf.checkpoint import CheckpointManager
from torch_rlhf.distributed import all_reduce_sum, barrier, is_main, rank_rows, world_size
from torch_rlhf.optim import (
    backward,
    build_train_engine,
    current_lr,
    optimizer_step,
    train_ds_config,
)
from torch_rlhf.runtime import build_model, lora_settings, open_run_logger, resolve_tokenizer
from torch_rlhf.saving import save_hf

__all__ = ["SupervisedTrainer"]


class SupervisedTrainer(LoopTrainer):
    """Base trainer of steps 1 (SFT) and 2 (reward model) on a DeepSpeed engine.

    Args:
      config: the whole run config; the step's section is ``config.sft`` / ``config.reward``.
      run_dir: the run directory; this step writes ``<run_dir>/<step>/``.
      model_name_or_path: the model to start from; default
        ``shared.supervised_loop.model_source`` (the config's directory, or a fresh model
        from its ``*_config``).
      run_logger: shared with the other steps of a pipeline; default: a new one on
        ``run_dir``.

    Attributes:
      engine: the DeepSpeed engine; ``iterator``, ``total_steps``, ``loop``: the
      ``SupervisedLoop``'s.
    """

    step: ClassVar[str]
    kind: ClassVar[str]  # "causal_lm" | "value"
    loop_class: ClassVar[type[SupervisedLoop]] = SupervisedLoop
    backend: ClassVar[str] = "torch"
    saves_in_background = False

    def __init__(self, config: RLHFConfig, *, run_dir: str | Path,
                 model_name_or_path: str | None = None, run_logger: RunLogger | None = None):
        self.config = config
        self.section = getattr(config, self.step)
        path, fresh = model_source(config, self.step)
        self.model_name_or_path = model_name_or_path or path
        fresh = None if self.model_name_or_path else fresh
        self.tokenizer = resolve_tokenizer(config, self.model_name_or_path)
        self.loop = self.loop_class(
            config, self.step, data=self.loop_class.build_data(config, self.tokenizer, self.step),
            run_dir=run_dir, run_logger=run_logger or open_run_logger(config, run_dir),
            data_parallel_size=world_size(), is_main=is_main(), barrier=barrier)
        s = self.section
        self.micro_batch_size = s.per_device_train_batch_size
        engine_cfg = config.engine.torch
        ds_config = train_ds_config(optim=s.optim, stage=engine_cfg.zero_stage,
                                    offload=engine_cfg.offload, dtype=config.model.dtype,
                                    micro_batch_size=s.per_device_train_batch_size,
                                    gradient_accumulation_steps=s.gradient_accumulation_steps)
        model = build_model(self.kind, config, self.tokenizer,
                            name_or_path=self.model_name_or_path, config_dict=fresh,
                            module=s.model, ds_config=ds_config)
        self.engine = build_train_engine(model, ds_config=ds_config, optim=s.optim,
                                         lora=s.model.lora, total_steps=self.total_steps)
        self.checkpoints = CheckpointManager(self.loop.checkpoints.root,
                                             keep=config.logging.keep_checkpoints)
        self.last_grad_norm: float | None = None

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train, evaluate, export ``<run>/<step>/final``; returns the ``summary.json``
        entry (``SupervisedLoop.run``)."""
        return self.loop.run(self, resume=resume)

    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the whole eval split ({} when the step has none)."""
        return self.loop.evaluate(self)

    # ----------------------------------------------------------------- subclass hooks

    def normalizer(self, batch) -> float:
        """The global count the step's loss is divided by (tokens, or rows)."""
        raise NotImplementedError

    def micro_step(self, batch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of this rank's micro-batch (already divided by ``normalizer``) and additive
        statistics (sums) for the step's metrics."""
        raise NotImplementedError

    def step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def local_eval_sums(self, batch, valid: np.ndarray) -> dict[str, float]:
        """Additive eval statistics of this rank's rows where ``valid`` (every key, zeros
        when no row counts: the sums are all-reduced by key)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the loop's protocol

    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step on a global batch; returns the step's metrics."""
        width = self.micro_batch_size * world_size()
        normalizer = self.normalizer(batch)
        lr = current_lr(self.engine)
        sums: Counter = Counter()
        self.engine.train()
        for g in range(self.section.gradient_accumulation_steps):
            micro = batch.take(slice(g * width, (g + 1) * width)).take(rank_rows(width))
            loss, stats = self.micro_step(micro, normalizer)
            backward(self.engine, loss)
            norm = optimizer_step(self.engine)
            if norm is not None:
                self.last_grad_norm = norm
            sums["loss"] += float(loss.detach())
            sums.update(stats)
        return {**self.step_metrics(_all_reduce(sums)), "lr": lr}

    def eval_sums(self, batch, valid: np.ndarray) -> dict[str, float]:
        local = rank_rows(len(valid))
        self.engine.eval()
        with torch.no_grad():
            sums = self.local_eval_sums(batch.take(local), valid[local])
        self.engine.train()
        return _all_reduce(sums)

    def save(self, path: Path, loop_state: dict[str, Any]) -> None:
        self.checkpoints.write(path, {"model": self.engine}, loop_state,
                               tokenizer=self.tokenizer,
                               lora={"model": lora_settings(self.section.model)})

    def wait_until_saved(self) -> None:
        return None

    def restore(self, path: Path) -> dict[str, Any]:
        return self.checkpoints.load(path, {"model": self.engine})

    def export(self, directory: Path) -> None:
        save_hf(self.engine, self.tokenizer, str(directory))

    def heldout_metrics(self) -> dict[str, float]:
        return {}


def _all_reduce(sums: dict[str, float]) -> dict[str, float]:
    keys = sorted(sums)
    return dict(zip(keys, all_reduce_sum([sums[k] for k in keys]), strict=True))
