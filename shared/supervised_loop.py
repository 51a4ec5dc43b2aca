"""The training loop of steps 1 and 2 (SFT and reward model), once for both backends.

One optimiser step takes a *global* batch of ``per_device_train_batch_size x data-parallel
size x gradient_accumulation_steps`` rows from a seeded, resumable
``shared.data.BatchIterator`` (shuffled, last partial batch dropped). The loop, for any
backend::

    while global_step < total_steps:
        metrics = backend.train_step(iterator.next_batch())      # one optimiser step
        global_step += 1
        log every logging.log_interval steps and at the last one
        evaluate every <step>.eval_interval steps (not at the last one)
        checkpoint every logging.save_interval steps (not at the last one)
    evaluate and checkpoint the last step (unless just done)
    backend.export(<run>/<step>/final); backend.heldout_metrics(); summary.json entry

What the loop owns: the iterator and its state, ``total_steps``, the cadences, the progress
bar and the run log (``metrics.jsonl``, TensorBoard), the eval pass over the eval split in
global chunks of ``per_device_eval_batch_size x data-parallel size`` rows (the last one padded
by repeating its last row, masked out by ``valid``), the eval metrics from the summed
statistics, the checkpoint directories (``shared.checkpoints``), resume (truncating
``metrics.jsonl`` to the resumed step), phase timings carried across a resume, and the
``summary.json`` entry, whose keys are the same for both backends.

What a backend implements (:class:`SupervisedBackend`): the optimiser step, the eval sums of
one chunk, writing and reading a checkpoint directory, exporting the model and its held-out
metric. Nothing here imports torch or jax.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from shared.checkpoints import CheckpointDir
from shared.console import FILE_ONLY, console_every
from shared.data import BatchIterator, StepData, build_step_data
from shared.exports import verify_export
from shared.guard import NonFiniteGuard, nonfinite_values
from shared.manifest import config_fingerprint
from shared.model_card import ExportCard, complete_export, describe_source
from shared.runlog import PhaseTimer, RunLogger, format_metrics, progress

__all__ = ["LOG_KEYS", "LoopTrainer", "SupervisedBackend", "SupervisedLoop", "eval_metrics",
           "model_source", "reward_ratios"]

logger = logging.getLogger(__name__)

LOG_KEYS = {"sft": ("loss", "lr", "grad_norm", "tokens"),
            "reward": ("loss", "accuracy", "chosen_score", "rejected_score", "lr"),
            "dpo": ("loss", "rewards/accuracies", "rewards/margins", "lr")}
"""The training metrics of each step printed in the run log (docs/architecture.md)."""


class SupervisedBackend(Protocol):
    """What the loop needs from a backend's SFT or reward-model trainer."""

    step: ClassVar[str]
    """``"sft"`` or ``"reward"``: the config section, run-directory folder and metric name."""
    backend: ClassVar[str]
    """``"torch"`` or ``"jax"``, recorded as ``summary.json``'s ``backend``."""
    saves_in_background: bool
    """True when ``save`` returns before the checkpoint is on disk (``wait_until_saved``
    blocks until it is); the loop then marks it complete before the next save and at the end."""

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimiser step on a global batch (all processes' rows); its metrics."""

    def eval_sums(self, batch: Any, valid: np.ndarray) -> dict[str, float]:
        """Additive eval statistics of the rows of a global chunk where ``valid`` (bool
        ``[rows]``), summed over every process (every process gets the same numbers)."""

    def save(self, path: Path, loop_state: dict[str, Any]) -> None:
        """Write a resumable checkpoint into the new directory ``path``: the model, optimiser
        and scheduler state, RNG state, and ``loop_state`` (JSON-compatible)."""

    def wait_until_saved(self) -> None:
        """Block until the last ``save`` is on disk (a no-op for a synchronous backend)."""

    def restore(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint in ``path`` into the model and optimiser; its ``loop_state``."""

    def export(self, directory: Path) -> None:
        """Save the trained model as a Hugging Face directory (adapters merged)."""

    def heldout_metrics(self) -> dict[str, float]:
        """The held-out metric of the final model (``eval.metric``); {} when there is none."""


def model_source(config: Any, step: str) -> tuple[str | None, Mapping[str, Any] | None]:
    """Where ``step``'s model starts when no directory is given: ``(path, None)`` to load one,
    ``(None, hf_config)`` to build a fresh one.

    SFT and DPO (the policy): ``model.actor_model_name_or_path``, else a fresh
    ``model.actor_config``. Reward:
    ``ModelConfig.reward_model_source`` (``model.critic_model_name_or_path``, else a fresh
    ``model.critic_config``, else the actor's base model with a fresh value head), the rule
    both backends and the PPO critic share.
    """
    model = config.model
    if step in ("sft", "dpo"):
        path, fresh = model.actor_model_name_or_path, model.actor_config
    elif step == "reward":
        path, fresh = model.reward_model_source()
    else:
        raise ValueError(f"step: {step!r} is invalid; allowed: sft, reward, dpo")
    if path is None and fresh is None:
        raise ValueError(f"{step}: no model to start from; set model.*_model_name_or_path or "
                         "model.*_config")
    return (path, None) if path is not None else (None, fresh)


def reward_ratios(sums: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Reward-model metrics from additive sums: ``accuracy`` (correct / pairs),
    ``chosen_score`` and ``rejected_score`` (means), each prefixed."""
    def ratio(num: str, den: str) -> float:
        return sums.get(num, 0.0) / max(sums.get(den, 0.0), 1.0)

    return {f"{prefix}accuracy": ratio("correct", "pairs"),
            f"{prefix}chosen_score": ratio("chosen_sum", "chosen_count"),
            f"{prefix}rejected_score": ratio("rejected_sum", "rejected_count")}


def eval_metrics(step: str, sums: Mapping[str, float]) -> dict[str, float]:
    """The eval metrics of ``step`` from the summed statistics of the whole eval split.

    SFT (sums ``nll``, ``tokens``): ``eval_loss`` = token-mean negative log-likelihood and
    ``eval_perplexity`` = exp(eval_loss). Reward (sums ``correct``, ``pairs``,
    ``chosen_sum``, ``chosen_count``, ``rejected_sum``, ``rejected_count``):
    ``eval_accuracy``, ``eval_chosen_score``, ``eval_rejected_score``. DPO:
    ``shared.dpo_step.dpo_metrics`` with ``eval_`` in front.
    """
    if step == "dpo":
        from shared.dpo_step import dpo_metrics  # it builds on this module

        return dpo_metrics(sums, "eval_")
    if step == "sft":
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    return reward_ratios(sums, "eval_")


def _no_barrier() -> None:
    return None


class SupervisedLoop:
    """Steps, cadences, checkpoints, resume, export and summary of one supervised step.

    A backend's trainer builds one (before its optimiser: the LR schedule needs
    ``total_steps``) and calls ``run(self)``.

    Args:
      config: the whole ``RLHFConfig``; the step's section is ``config.<step>``.
      step: ``"sft"`` or ``"reward"``.
      data: the step's tokenised data (``shared.data.build_step_data``).
      run_dir: the run directory; the step writes ``<run_dir>/<step>/``.
      run_logger: the run's ``metrics.jsonl`` / TensorBoard / ``summary.json`` writer.
      data_parallel_size: how many data-parallel shards a per-device batch size counts.
      is_main: whether this process writes (logs, markers, progress bar).
      barrier: waits for every process.

    Attributes:
      iterator: the training batches; ``total_steps``: optimiser steps of the whole step;
      ``global_step``: steps done; ``eval_metrics``: the latest eval figures.
    """

    def __init__(self, config: Any, step: str, *, data: StepData, run_dir: str | Path,
                 run_logger: RunLogger, data_parallel_size: int = 1, is_main: bool = True,
                 barrier: Callable[[], None] = _no_barrier):
        if step not in LOG_KEYS:
            raise ValueError(f"step: {step!r} is invalid; allowed: {', '.join(LOG_KEYS)}")
        self.config = config
        self.step = step
        self.section = getattr(config, step)
        self.data = data
        self.run_dir = Path(run_dir)
        self.step_dir = self.run_dir / step
        self.run_logger = run_logger
        self.data_parallel_size = data_parallel_size
        self.is_main = is_main
        s = self.section
        self.global_batch_size = (s.per_device_train_batch_size * data_parallel_size
                                  * s.gradient_accumulation_steps)
        self.iterator = BatchIterator(data.train, self.global_batch_size, seed=config.seed,
                                      shuffle=True, drop_last=True, name=f"{step} train")
        # max_steps, when set, is the number of optimiser steps (as in HF/TRL): the data
        # cycles through as many epochs as it takes and num_train_epochs is ignored
        self.total_steps = (s.max_steps if s.max_steps is not None
                            else s.num_train_epochs * self.iterator.batches_per_epoch)
        self.num_epochs = -(-self.total_steps // self.iterator.batches_per_epoch)
        """Epochs the run touches (the last one maybe in part): num_train_epochs, or what
        max_steps takes."""
        self.checkpoints = CheckpointDir(self.step_dir / "checkpoints",
                                         keep=config.logging.keep_checkpoints,
                                         is_main=is_main, barrier=barrier)
        self.global_step = 0
        self.eval_metrics: dict[str, float] = {}
        self.evaluated_at: int | None = None
        self.timer = PhaseTimer()
        self.elapsed: dict[str, float] = {}  # seconds per phase, carried over a resume
        self._saved_at: int | None = None
        self._pending: Path | None = None  # saved in the background, not yet marked complete
        self.guard = NonFiniteGuard(step, max_consecutive=config.guard.max_consecutive_skips)

    @classmethod
    def build_data(cls, config: Any, tokenizer: Any, step: str) -> StepData:
        """The step's tokenised data (``shared.data.build_step_data``; `DPOLoop` converts the
        reward step's comparisons)."""
        return build_step_data(config.data, tokenizer, step)

    # ----------------------------------------------------------------- state

    def _collect_times(self) -> None:
        for key, seconds in self.timer.pop().items():
            self.elapsed[key] = self.elapsed.get(key, 0.0) + seconds

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the loop (JSON-compatible)."""
        self._collect_times()
        return {"global_step": self.global_step, "iterator": self.iterator.state_dict(),
                "elapsed": dict(self.elapsed), "eval_metrics": dict(self.eval_metrics),
                "evaluated_at": self.evaluated_at, "guard": self.guard.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.iterator.load_state_dict(state["iterator"])
        self.elapsed = {k: float(v) for k, v in state["elapsed"].items()}
        self.eval_metrics = {k: float(v) for k, v in state["eval_metrics"].items()}
        evaluated_at = state["evaluated_at"]
        self.evaluated_at = None if evaluated_at is None else int(evaluated_at)
        self.guard.load_state_dict(state.get("guard"))

    # ----------------------------------------------------------------- checkpoints

    def save(self, backend: SupervisedBackend) -> Path:
        """A resumable checkpoint named after ``global_step``."""
        self._commit(backend)
        with self.timer.phase("checkpoint"):
            path = self.checkpoints.prepare(self.checkpoints.tag(self.global_step))
            backend.save(path, self.state_dict())
        self._saved_at = self.global_step
        self._pending = path
        if not backend.saves_in_background:
            self._commit(backend)
        return path

    def _commit(self, backend: SupervisedBackend) -> None:
        if self._pending is not None:
            backend.wait_until_saved()
            self.checkpoints.commit(self._pending, backend=backend.backend, config=self.config)
            self._pending = None

    def resume(self, backend: SupervisedBackend) -> bool:
        """Continue from the latest complete checkpoint; False when there is none.

        ``metrics.jsonl`` loses the records this step logged after that checkpoint, which
        the resumed run logs again. A checkpoint of another backend or config, or with a
        changed file, is refused (``CheckpointDir.verify``).
        """
        latest = self.checkpoints.latest()
        if latest is None:
            logger.info("%s: no checkpoint in %s; starting from step 0", self.step,
                        self.checkpoints.root)
            self.run_logger.truncate(self.step, 0)  # killed before its first checkpoint
            return False
        self.checkpoints.verify(latest, backend=backend.backend, config=self.config)
        self.load_state_dict(backend.restore(latest))
        self._saved_at = self.global_step
        self.run_logger.truncate(self.step, self.global_step + 1)
        logger.info("%s: resumed from %s at step %d/%d", self.step, latest, self.global_step,
                    self.total_steps)
        return True

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, backend: SupervisedBackend) -> dict[str, float]:
        """Eval metrics over the whole eval split ({} when the step has none)."""
        data = self.data.eval
        if data is None or len(data) == 0:
            return {}
        width = self.section.per_device_eval_batch_size * self.data_parallel_size
        rows = len(data)
        padded = -(-rows // width) * width
        order = np.minimum(np.arange(padded), rows - 1)
        valid = np.arange(padded) < rows
        totals: dict[str, float] = {}
        for start in range(0, padded, width):
            chunk = slice(start, start + width)
            for key, value in backend.eval_sums(data.take(order[chunk]), valid[chunk]).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return eval_metrics(self.step, totals)

    def _evaluate_and_log(self, backend: SupervisedBackend) -> None:
        with self.timer.phase("evaluation"):
            self.eval_metrics = self.evaluate(backend)
        self.evaluated_at = self.global_step
        if self.eval_metrics:
            self.run_logger.log(self.step, self.global_step, self.eval_metrics)
            logger.info("%s step %d/%d eval %s", self.step, self.global_step, self.total_steps,
                        format_metrics(self.eval_metrics, tuple(self.eval_metrics)))

    # ----------------------------------------------------------------- the loop

    def fit(self, backend: SupervisedBackend, *, resume: bool = False) -> dict[str, float]:
        """Train to ``total_steps`` (from the latest checkpoint with ``resume``), evaluate
        and checkpoint the last step; returns the final eval metrics."""
        if resume:
            self.resume(backend)
        cfg = self.config.logging
        bar = progress(self.total_steps, desc=self.step, initial=self.global_step,
                       enabled=cfg.progress_bar and self.is_main)
        on_console = console_every(self.total_steps, log_interval=cfg.log_interval,
                                   lines=cfg.console_lines)
        postfix = LOG_KEYS[self.step][:2]
        try:
            while self.global_step < self.total_steps:
                with self.timer.phase("training"):
                    metrics = backend.train_step(self.iterator.next_batch())
                self.global_step += 1
                # a non-finite loss or gradient norm: the backend did not apply the step
                problems = nonfinite_values(metrics, ("loss", "grad_norm"))
                if problems:  # the checkpoint to name: a save in the background counts
                    self._commit(backend)
                self.guard.record(f"step {self.global_step}", problems,
                                  last_checkpoint=self.checkpoints.latest() if problems else None)
                metrics = {**metrics, "skipped_steps": self.guard.skipped}
                last = self.global_step == self.total_steps
                if self.global_step % cfg.log_interval == 0 or last:
                    self.run_logger.log(self.step, self.global_step, metrics)
                    shown = last or (on_console and self.global_step % on_console == 0)
                    logger.info("%s epoch %d/%d|step %d/%d|%s", self.step,
                                self.iterator.epoch + 1, self.num_epochs,
                                self.global_step, self.total_steps,
                                format_metrics(metrics, LOG_KEYS[self.step]),
                                extra=None if shown else FILE_ONLY)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{float(metrics[k]):.4g}" for k in postfix
                                 if isinstance(metrics.get(k), (float, np.floating))},
                                refresh=False)
                interval = self.section.eval_interval
                if interval and self.global_step % interval == 0 and not last:
                    self._evaluate_and_log(backend)
                if cfg.save_interval and self.global_step % cfg.save_interval == 0 and not last:
                    self.save(backend)
            if self.evaluated_at != self.global_step:
                self._evaluate_and_log(backend)
            if self._saved_at != self.global_step:
                self.save(backend)
            self._commit(backend)
        except BaseException:
            # finish a save running in the background (a whole state of an earlier step)
            # before the interpreter's exit stops its thread; its own failure is only logged
            try:
                self._commit(backend)
            except Exception as exc:  # noqa: BLE001 (the failure being raised matters more)
                self._pending = None
                logger.warning("%s: the checkpoint being saved when the run failed is not "
                               "complete: %s", self.step, exc)
            raise
        finally:
            bar.close()
        return self.eval_metrics

    def _card(self, backend: SupervisedBackend) -> ExportCard:
        path = getattr(backend, "model_name_or_path", None)
        fresh = None
        if path is None:
            path, fresh = model_source(self.config, self.step)
        key = "model.actor_config" if self.step in ("sft", "dpo") else "model.critic_config"
        return ExportCard(backend=backend.backend, step=self.step, role="final",
                          run_dir=str(self.run_dir),
                          progress=f"step {self.global_step} of {self.total_steps}",
                          base_model=describe_source(path and str(path), fresh, key),
                          config_sha256=config_fingerprint(self.config)[1])

    def run(self, backend: SupervisedBackend, *, resume: bool = False) -> dict[str, Any]:
        """``fit``, then export ``<run>/<step>/final``, the held-out metric and this step's
        ``summary.json`` entry, which it returns: the final eval metrics, ``heldout`` (when
        ``eval.metric`` gives one), ``steps``, ``final_model`` and ``timings`` (seconds per
        phase, ``<phase>_time``, summed over a resume, and this process's ``wall_time``)."""
        start = time.perf_counter()
        self.fit(backend, resume=resume)
        final = self.step_dir / "final"
        with self.timer.phase("export"):
            backend.export(final)
            if self.is_main:  # read back: a non-finite or truncated model is never final
                complete_export(final, self._card(backend))
                verify_export(final, complete=True)
        with self.timer.phase("heldout_evaluation"):
            heldout = backend.heldout_metrics()
        self._collect_times()
        timings = {k: round(v, 3) for k, v in sorted(self.elapsed.items())}
        timings["wall_time"] = round(time.perf_counter() - start, 3)
        entry: dict[str, Any] = dict(self.eval_metrics)
        if heldout:
            entry["heldout"] = heldout
        entry.update(steps=self.global_step, final_model=str(final), timings=timings,
                     data_quality=self.data.quality)
        self.run_logger.finish_step(self.step, self.global_step,  # summary, TB, plots/
                                    **{self.step: entry, "backend": backend.backend})
        logger.info("%s done: %s -> %s", self.step,
                    format_metrics(self.eval_metrics, tuple(self.eval_metrics)), final)
        return entry


class LoopTrainer:
    """The public face both backends' SFT and reward trainers share: a trainer that holds its
    `SupervisedLoop` as ``self.loop`` and implements `SupervisedBackend` itself."""

    loop: SupervisedLoop

    @property
    def iterator(self):
        """The training data's resumable `BatchIterator`."""
        return self.loop.iterator

    @property
    def total_steps(self) -> int:
        return self.loop.total_steps

    @property
    def data(self):
        return self.loop.data
