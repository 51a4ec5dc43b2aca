"""The loop steps 1 and 2 share: global batches, accumulation, eval, checkpoints, logging.

One optimiser step takes a *global* batch of ``per_device_train_batch_size x world_size x
gradient_accumulation_steps`` rows from a seeded, resumable ``shared.data.BatchIterator``.
Micro-batch g is rows ``[g * m * W, (g + 1) * m * W)`` and each rank trains on its
contiguous slice of it. The loss of every micro-batch is divided by the count of the
whole global batch (``normaliser``), so the step's gradient is the same for any
micro-batch size, accumulation or number of ranks (see ``torch_rlhf.optim``).

Subclasses (:class:`torch_rlhf.sft.SFTTrainer`, :class:`torch_rlhf.reward.RewardTrainer`)
say how a micro-batch becomes a loss and how the eval set is scored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.data import BatchIterator, StepData, build_step_data
from shared.runlog import PhaseTimer, RunLogger, progress
from torch_rlhf.checkpoint import CheckpointManager, truncate_metrics
from torch_rlhf.distributed import all_reduce_sum, is_main, rank_rows, world_size
from torch_rlhf.optim import (
    backward,
    build_train_engine,
    current_lr,
    optimizer_step,
    train_ds_config,
)
from torch_rlhf.runtime import (
    build_model,
    format_metrics,
    lora_settings,
    open_run_logger,
    resolve_tokenizer,
)
from torch_rlhf.saving import save_hf

__all__ = ["SupervisedTrainer"]

logger = logging.getLogger(__name__)


class SupervisedTrainer:
    """Base trainer of steps 1 (SFT) and 2 (reward model) on a DeepSpeed engine.

    Args:
      config: the whole run config; the step's section is ``config.sft`` / ``config.reward``.
      run_dir: the run directory; this step writes ``<run_dir>/<step>/``.
      model_name_or_path: the model to start from; default: the config's (or a fresh
        model from its ``*_config``).
      tokenizer: default: ``model.tokenizer_name_or_path`` or the model's directory.
      data: the step's tokenised data; default: ``shared.data.build_step_data``.
      run_logger: shared with other steps of a pipeline; default: a new one on ``run_dir``.
    """

    step: ClassVar[str]
    kind: ClassVar[str]  # "causal_lm" | "value"
    log_keys: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, config: RLHFConfig, *, run_dir: str | Path,
                 model_name_or_path: str | None = None, tokenizer=None,
                 data: StepData | None = None, run_logger: RunLogger | None = None):
        self.config = config
        self.section = getattr(config, self.step)
        self.run_dir = Path(run_dir)
        self.step_dir = self.run_dir / self.step
        source, config_dict = self._default_source()
        self.model_name_or_path = model_name_or_path or source
        self.tokenizer = tokenizer or resolve_tokenizer(config, self.model_name_or_path)
        self.data = data or build_step_data(config.data, self.tokenizer, self.step)
        self.run_logger = run_logger or open_run_logger(config, run_dir)
        s = self.section
        self.micro_batch_size = s.per_device_train_batch_size
        self.global_batch_size = (s.per_device_train_batch_size * world_size()
                                  * s.gradient_accumulation_steps)
        self.iterator = BatchIterator(self.data.train, self.global_batch_size, seed=config.seed,
                                      shuffle=True, drop_last=True, name=f"{self.step} train")
        self.total_steps = s.num_train_epochs * self.iterator.batches_per_epoch
        if s.max_steps is not None:
            self.total_steps = min(self.total_steps, s.max_steps)
        engine_cfg = config.engine.torch
        ds_config = train_ds_config(optim=s.optim, stage=engine_cfg.zero_stage,
                                    offload=engine_cfg.offload, dtype=config.model.dtype,
                                    micro_batch_size=s.per_device_train_batch_size,
                                    gradient_accumulation_steps=s.gradient_accumulation_steps)
        model = build_model(self.kind, config, self.tokenizer,
                            name_or_path=self.model_name_or_path,
                            config_dict=None if self.model_name_or_path else config_dict,
                            module=s.model, ds_config=ds_config)
        self.engine = build_train_engine(model, ds_config=ds_config, optim=s.optim,
                                         lora=s.model.lora, total_steps=self.total_steps)
        self.checkpoints = CheckpointManager(self.step_dir / "checkpoints",
                                             keep=config.logging.keep_checkpoints)
        self.global_step = 0
        self.last_grad_norm: float | None = None
        self.timer = PhaseTimer()
        self.elapsed: Counter = Counter()  # seconds per phase, carried over a resume
        self.eval_metrics: dict[str, float] = {}
        self.evaluated_at: int | None = None

    # ----------------------------------------------------------------- subclass hooks

    def _default_source(self) -> tuple[str | None, Mapping[str, Any] | None]:
        raise NotImplementedError

    def normalizer(self, batch) -> float:
        """The global count the step's loss is divided by (tokens, or rows)."""
        raise NotImplementedError

    def micro_step(self, batch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of this rank's micro-batch (already divided by ``normalizer``) and additive
        statistics (sums) for the step's metrics."""
        raise NotImplementedError

    def step_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def eval_sums(self, batch, valid: np.ndarray) -> dict[str, float]:
        """Additive eval statistics of this rank's rows where ``valid`` (fillers excluded)."""
        raise NotImplementedError

    def eval_metrics_from(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def final_extras(self) -> dict[str, Any]:
        """More entries of this step's summary (e.g. the held-out metric after SFT)."""
        return {}

    # ----------------------------------------------------------------- training

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
        keys = sorted(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys]), strict=True))
        return {**self.step_metrics(totals), "lr": lr}

    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval set ({} when the step has none)."""
        data = self.data.eval
        if data is None or len(data) == 0:
            return {}
        width = self.section.per_device_eval_batch_size * world_size()
        rows = len(data)
        padded = -(-rows // width) * width
        order = np.minimum(np.arange(padded), rows - 1)
        valid = np.arange(padded) < rows
        sums: Counter = Counter()
        self.engine.eval()
        with torch.no_grad():
            for start in range(0, padded, width):
                mine = slice(start, start + width)
                local = rank_rows(width)
                sums.update(self.eval_sums(data.take(order[mine][local]), valid[mine][local]))
        self.engine.train()
        keys = sorted(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys]), strict=True))
        return self.eval_metrics_from(totals)

    def _evaluate_and_log(self) -> None:
        with self.timer.phase("evaluation"):
            self.eval_metrics = self.evaluate()
        self.evaluated_at = self.global_step
        if self.eval_metrics:
            self.run_logger.log(self.step, self.global_step, self.eval_metrics)
            logger.info("%s step %d/%d eval %s", self.step, self.global_step, self.total_steps,
                        format_metrics(self.eval_metrics, tuple(self.eval_metrics)))

    # ----------------------------------------------------------------- checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        self.elapsed.update(self.timer.pop())
        return {"global_step": self.global_step, "iterator": self.iterator.state_dict(),
                "elapsed": dict(self.elapsed), "eval_metrics": self.eval_metrics,
                "evaluated_at": self.evaluated_at}

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint named after the optimiser step."""
        return self.checkpoints.save(
            f"step-{self.global_step:08d}", {"model": self.engine}, self._trainer_state(),
            tokenizer=self.tokenizer, lora={"model": lora_settings(self.section.model)})

    def resume(self) -> bool:
        """Continue from the latest checkpoint of this step; False when there is none."""
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("%s: no checkpoint in %s; starting from step 0", self.step,
                        self.checkpoints.root)
            return False
        state = self.checkpoints.load(latest, {"model": self.engine})
        self.global_step = int(state["global_step"])
        self.iterator.load_state_dict(state["iterator"])
        self.elapsed = Counter(state["elapsed"])
        self.eval_metrics = dict(state["eval_metrics"])
        self.evaluated_at = state["evaluated_at"]
        truncate_metrics(self.run_dir, self.step, "iteration", self.global_step + 1)
        logger.info("%s: resumed from %s at step %d/%d", self.step, latest, self.global_step,
                    self.total_steps)
        return True

    # ----------------------------------------------------------------- the loop

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Train to ``total_steps``, evaluate, save ``<step>/final`` and the summary entry.

        Returns this step's ``summary.json`` entry.
        """
        if resume:
            self.resume()
        cfg = self.config.logging
        start = time.perf_counter()
        bar = progress(self.total_steps, desc=self.step, initial=self.global_step,
                       enabled=cfg.progress_bar and is_main())
        while self.global_step < self.total_steps:
            with self.timer.phase("training"):
                metrics = self.train_step(self.iterator.next_batch())
            self.global_step += 1
            last = self.global_step == self.total_steps
            if self.global_step % cfg.log_interval == 0 or last:
                self.run_logger.log(self.step, self.global_step, metrics)
                logger.info("%s epoch %d/%d|step %d/%d|%s", self.step, self.iterator.epoch + 1,
                            self.section.num_train_epochs, self.global_step, self.total_steps,
                            format_metrics(metrics, self.log_keys))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            interval = self.section.eval_interval
            if interval and self.global_step % interval == 0 and not last:
                self._evaluate_and_log()
            if cfg.save_interval and self.global_step % cfg.save_interval == 0 and not last:
                self.save_checkpoint()
        bar.close()
        if self.evaluated_at != self.global_step:
            self._evaluate_and_log()
        latest = self.checkpoints.latest()
        if latest is None or latest.name != f"step-{self.global_step:08d}":
            self.save_checkpoint()
        return self._finish(time.perf_counter() - start)

    def _finish(self, seconds: float) -> dict[str, Any]:
        final = self.step_dir / "final"
        save_hf(self.engine, self.tokenizer, str(final))
        with self.timer.phase("heldout_evaluation"):
            extras = self.final_extras()
        self.elapsed.update(self.timer.pop())
        timings = {k: round(v, 3) for k, v in sorted(self.elapsed.items())}
        timings["wall_time"] = round(seconds, 3)
        entry = {**self.eval_metrics, **extras, "timings": timings, "final_model": str(final)}
        self.run_logger.update_summary(**{self.step: entry, "backend": "torch"})
        logger.info("%s done: %s -> %s", self.step,
                    format_metrics(self.eval_metrics, tuple(self.eval_metrics)), final)
        return entry

