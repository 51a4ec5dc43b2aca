"""The run directory both backends write, so their outputs look the same.

Layout of ``<output_dir>/<run_name>/``::

    config.yaml          the resolved config (reloads to the same RLHFConfig)
    metrics.jsonl        one JSON object per logged step: {"step": "ppo", "iteration": 3, ...}
    tensorboard/         TensorBoard events (tensorboardX), scalars named "<step>/<metric>"
    summary.json         the held-out metric after each step, final reward, KL, timings
    sft/ reward/ ppo/    each step's final Hugging Face model and its checkpoints/

Only the main process (rank 0) writes. Nothing here imports torch or jax.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from shared.config import RLHFConfig, load_config, save_config

__all__ = ["PhaseTimer", "RunLogger", "format_metrics", "prepare_run_dir", "progress",
           "truncate_metrics"]

logger = logging.getLogger(__name__)


def prepare_run_dir(config: RLHFConfig, *, config_path: str | Path | None = None,
                    run_dir: str | Path | None = None, resume: bool = False,
                    is_main: bool = True) -> Path:
    """Create (or, with ``resume``, reopen) the run directory and snapshot the config.

    Resuming requires the snapshot to equal ``config``: continuing a run under
    different settings would silently break the "same losses as an
    uninterrupted run" promise, so a difference is an error naming the file.
    """
    if run_dir is None:
        stem = Path(config_path).stem if config_path else "run"
        name = config.run_name or f"{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        run_dir = Path(config.output_dir) / name
    run_dir = Path(run_dir)
    snapshot = run_dir / "config.yaml"
    if resume:
        if not snapshot.exists():
            raise FileNotFoundError(f"--resume: no run to resume at {run_dir} ({snapshot} missing)")
        if load_config(snapshot) != config:
            raise ValueError(f"--resume: the config differs from the run's snapshot {snapshot}; "
                             "resume with `--config {snapshot}`")
        return run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, snapshot)
    return run_dir


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)  # numpy / torch / jax scalars
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else str(number)


class RunLogger:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; keeps ``summary.json``."""

    def __init__(self, run_dir: str | Path, *, enable_tensorboard: bool = True,
                 tensorboard_path: str | Path | None = None, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._writer = None
        if is_main and enable_tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(tensorboard_path or self.run_dir / "tensorboard"))

    def log(self, step: str, index: int, metrics: Mapping[str, Any], *,
            index_name: str = "iteration") -> None:
        """Record ``metrics`` of ``step`` ("sft", "reward", "ppo") at ``index``."""
        if not self.is_main:
            return
        record = {"step": step, index_name: index, "time": time.time(), **_plain(metrics)}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", index_name, "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{step}/{key}", value, index)

    def truncate(self, step: str, first_dropped: int, *, index_name: str = "iteration") -> None:
        """``truncate_metrics`` of this run, on the main process only."""
        truncate_metrics(self.run_dir, step, index_name, first_dropped, is_main=self.is_main)

    def update_summary(self, **entries: Any) -> dict[str, Any]:
        """Merge ``entries`` into ``summary.json`` and return the whole summary.

        Every rank may read the file; only the main process writes it, atomically (a
        temporary file renamed over it), so another rank never reads a half-written one.
        """
        path = self.run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.update(_plain(entries))
        if self.is_main:
            partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            os.replace(partial, path)
        return summary

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def truncate_metrics(run_dir: str | Path, step: str, index_name: str, first_dropped: int, *,
                     is_main: bool = True) -> None:
    """Drop ``metrics.jsonl`` records of ``step`` logged at ``index_name >= first_dropped``.

    A run killed after its last checkpoint has logged steps that the resumed run logs again;
    dropping them leaves the file as an uninterrupted run writes it. Only the main process
    writes (atomically: other ranks may read the file).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not is_main or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        late = record.get("step") == step and record.get(index_name, -1) >= first_dropped
        if not late:
            kept.append(line)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


class PhaseTimer:
    """Wall-clock time per phase (generation, scoring, training, ...), as DS-Chat logs it."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """Return the accumulated times as ``{"<phase>_time": seconds}`` and reset."""
        out = {f"{k}_time": v for k, v in self.totals.items()}
        self.totals = {}
        return out


def progress(total: int, *, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar with ETA (disabled on non-main ranks or when ``enabled`` is false)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True,
                unit="step")


def format_metrics(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    """``key: value|key: value`` for the keys present, as DS-Chat prints its run log."""
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else
                         f"{key}: {value}")
    return "|".join(parts)
