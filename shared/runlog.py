"""The run directory both backends write, so their outputs look the same.

Layout of ``<output_dir>/<run_name>/``::

    config.yaml          the resolved config (reloads to the same RLHFConfig)
    metrics.jsonl        one JSON object per logged step: {"step": "ppo", "iteration": 3, ...}
    tensorboard/         TensorBoard events (tensorboardX), scalars named "<step>/<metric>";
                         the held-out metric as "<step>/heldout_<metric>" and "heldout/<metric>"
    plots/               PNG curves of each step (shared.plots), drawn when the step ends
    summary.json         the held-out metric after each step, final reward, KL, timings
    sft/ reward/ ppo/    each step's final Hugging Face model and its checkpoints/
    .lock                the owner (pid, host, start) of the run writing it (shared.runlock)

Only the main process (rank 0) writes. Nothing here imports torch or jax.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from shared.config import ConfigError, RLHFConfig, load_config, save_config, to_dict
from shared.errors import InputError
from shared.manifest import MANIFEST, ResumeMismatchError, backend_hint, config_diff, describe_diff
from shared.runlock import check_run_dir_free

__all__ = ["PhaseTimer", "RunLogger", "check_run_backend", "find_run", "format_metrics",
           "prepare_run_dir", "progress", "truncate_metrics"]

logger = logging.getLogger(__name__)


def prepare_run_dir(config: RLHFConfig, *, config_path: str | Path | None = None,
                    run_dir: str | Path | None = None, resume: bool = False,
                    is_main: bool = True, backend: str | None = None) -> Path:
    """Create (or, with ``resume``, reopen) the run directory and snapshot the config.

    Without ``run_dir``: ``<output_dir>/<run_name>``, else a new
    ``<output_dir>/<config stem>-<UTC time>``; with ``resume``, the newest existing run of
    that name (``find_run``). A directory another live run owns is refused at once
    (``shared.runlock``), before anything is written.

    Resuming requires the snapshot to equal ``config``: continuing a run under
    different settings would silently break the "same losses as an
    uninterrupted run" promise, so a difference is an error naming each differing key.
    With ``backend``, a run another backend wrote is refused too (``check_run_backend``).
    """
    if run_dir is None and resume:
        run_dir = find_run(config, config_path=config_path)
    elif run_dir is None:
        stem = Path(config_path).stem if config_path else "run"
        name = config.run_name or f"{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        run_dir = Path(config.output_dir) / name
    run_dir = Path(run_dir)
    snapshot = run_dir / "config.yaml"
    if is_main:
        check_run_dir_free(run_dir)
    if resume:
        if not snapshot.exists():
            raise FileNotFoundError(f"--resume: no run to resume at {run_dir} ({snapshot} missing)")
        saved = load_config(snapshot)
        if saved != config:
            what = describe_diff(config_diff(saved, config)) or "they differ"
            raise ResumeMismatchError(
                f"--resume: the config differs from the run's snapshot {snapshot} "
                f"(run -> now): {what}; resume with `--config {snapshot}` and no overrides, "
                "or start a new run")
        if backend is not None:
            check_run_backend(run_dir, backend)
        return run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, snapshot)
    return run_dir


def find_run(config: RLHFConfig, *, config_path: str | Path | None = None) -> Path:
    """The run ``--resume`` without ``--run-dir`` continues: ``<output_dir>/<run_name>`` when
    the config names one, else the newest ``<output_dir>/<config stem>-<UTC time>`` holding a
    ``config.yaml`` (the names sort by time); logs which one."""
    output = Path(config.output_dir)
    if config.run_name:
        run_dir = output / config.run_name
        logger.info("--resume: continuing %s (run_name %r)", run_dir, config.run_name)
        return run_dir
    stem = Path(config_path).stem if config_path else "run"
    timestamped = re.compile(re.escape(stem) + r"-\d{8}-\d{6}")
    runs = sorted(p for p in output.glob(f"{stem}-*")
                  if timestamped.fullmatch(p.name) and (p / "config.yaml").is_file())
    if not runs:
        raise FileNotFoundError(
            f"--resume: no run of {stem!r} to continue in {output} (looked for "
            f"{output / stem}-YYYYmmdd-HHMMSS/config.yaml); pass --run-dir")
    logger.info("--resume: continuing %s, the newest of %d run(s) of %r in %s", runs[-1],
                len(runs), stem, output)
    return runs[-1]


def _run_backends(run_dir: Path) -> list[tuple[str, str]]:
    """``(backend, where it is recorded)`` from ``summary.json`` and checkpoint manifests."""
    found = []
    summary = run_dir / "summary.json"
    if summary.is_file():
        backend = json.loads(summary.read_text()).get("backend")
        if backend:
            found.append((backend, str(summary)))
    for manifest in sorted(run_dir.glob(f"*/checkpoints/*/{MANIFEST}")):
        try:
            backend = json.loads(manifest.read_text()).get("backend")
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the checkpoint's own verification names it
        if backend:
            found.append((backend, str(manifest)))
    return found


def check_run_backend(run_dir: str | Path, backend: str) -> None:
    """Refuse (``ResumeMismatchError``) to resume ``run_dir`` on ``backend`` when its
    ``summary.json`` or a checkpoint manifest says another backend wrote it."""
    run_dir = Path(run_dir)
    for written, where in _run_backends(run_dir):
        if written != backend:
            raise ResumeMismatchError(f"--resume: cannot continue {run_dir} ({where}): "
                                      f"{backend_hint(written, backend)}")


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


HELDOUT_STAGE = {"sft": 1, "reward": 2, "dpo": 2, "ppo": 3}
"""The x of ``heldout/<metric>`` in TensorBoard: the model after SFT, then after RL."""


class RunLogger:
    """Appends metrics to ``metrics.jsonl``, TensorBoard and (``report_to: [wandb]``) Weights
    & Biases; keeps ``summary.json``; draws ``plots/`` when a step ends (``finish_step``).

    ``from_config`` builds one from the config's ``logging`` section."""

    def __init__(self, run_dir: str | Path, *, enable_tensorboard: bool = True,
                 tensorboard_path: str | Path | None = None, is_main: bool = True,
                 report_to: tuple[str, ...] = ("tensorboard",), plots: bool = False,
                 config: RLHFConfig | None = None):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.plots = plots
        self._writer = None
        self._wandb = None
        self._wandb_steps: set[str] = set()
        if is_main:
            drop_torn_record(self.run_dir / "metrics.jsonl")
        if is_main and enable_tensorboard and "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(tensorboard_path or self.run_dir / "tensorboard"))
        if is_main and "wandb" in report_to:
            self._wandb = _open_wandb(self.run_dir, config)

    @classmethod
    def from_config(cls, config: RLHFConfig, run_dir: str | Path, *,
                    is_main: bool = True) -> RunLogger:
        """The run logger ``config.logging`` asks for (TensorBoard, W&B, plots)."""
        cfg = config.logging
        return cls(run_dir, enable_tensorboard=cfg.enable_tensorboard,
                   tensorboard_path=cfg.tensorboard_path, is_main=is_main,
                   report_to=cfg.report_to, plots=cfg.plots, config=config)

    def log(self, step: str, index: int, metrics: Mapping[str, Any], *,
            index_name: str = "iteration") -> None:
        """Record ``metrics`` of ``step`` ("sft", "reward", "ppo") at ``index``."""
        if not self.is_main:
            return
        record = {"step": step, index_name: index, "time": time.time(), **_plain(metrics)}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(step, index_name, index,
                      {f"{step}/{key}": value for key, value in record.items()
                       if key not in ("step", index_name, "time")})

    def _scalars(self, step: str, index_name: str, index: int,
                 tagged: Mapping[str, Any]) -> None:
        """Numbers of ``tagged`` ({tag: value}) to TensorBoard and W&B at ``index``."""
        numbers = {tag: value for tag, value in tagged.items()
                   if isinstance(value, (int, float))}
        if self._writer is not None:
            for tag, value in numbers.items():
                self._writer.add_scalar(tag, value, index)
        if self._wandb is not None and numbers:
            axis = f"{step}/{index_name}"
            if step not in self._wandb_steps:  # each step's curves against its own counter
                self._wandb.define_metric(axis)
                self._wandb.define_metric(f"{step}/*", step_metric=axis)
                self._wandb_steps.add(step)
            self._wandb.log({**numbers, axis: index})

    def finish_step(self, step: str, index: int, *, index_name: str = "iteration",
                    **entries: Any) -> dict[str, Any]:
        """The end of ``step`` at ``index``: ``update_summary(**entries)``, its held-out metric
        (``entries[step]["heldout"]``, ``["heldout_ema"]``) to TensorBoard and W&B as
        ``<step>/heldout_<metric>`` at ``index`` and ``heldout/<metric>`` at the step's place
        in the pipeline (``HELDOUT_STAGE``), and, with ``plots``, ``<run>/plots/<step>.png``
        (a failure to draw is only a warning). Returns the summary."""
        summary = self.update_summary(**entries)
        entry = entries.get(step)
        if self.is_main and isinstance(entry, Mapping):
            for key in ("heldout", "heldout_ema"):
                values = entry.get(key)
                if not isinstance(values, Mapping):
                    continue
                suffix = "_ema" if key == "heldout_ema" else ""
                self._scalars(step, index_name, index,
                              {f"{step}/{key}_{name}": v for name, v in values.items()})
                if step in HELDOUT_STAGE:
                    self._scalars("heldout", "stage", HELDOUT_STAGE[step],
                                  {f"heldout/{name}{suffix}": v for name, v in values.items()})
            if self._writer is not None:
                self._writer.flush()
        if self.is_main and self.plots:
            from shared.plots import safe_plot_run

            safe_plot_run(self.run_dir, steps=[step])
        return summary

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_wandb(run_dir: Path, config: RLHFConfig | None):
    """A Weights & Biases run named after ``run_dir`` (its files under it), holding the
    config; ``ConfigError`` naming ``logging.report_to`` when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.report_to: lists wandb, but the wandb package is not "
                          "installed; `pip install wandb` (and `wandb login`, or "
                          "WANDB_MODE=offline), or take wandb out of logging.report_to") from None
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf"), name=run_dir.name,
                      dir=str(run_dir), config=None if config is None else to_dict(config))


def drop_torn_record(path: Path) -> None:
    """Cut a last line that was not written whole (disk full, or a kill during the write)
    from ``path``, with a warning; the run that logged it logs that record again on resume.
    Every complete record ends with a newline, so only the text after the last one is cut."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping its last line, a record that was not written whole "
                       "(%d bytes)", path, len(data) - keep)
        f.truncate(keep)


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
    drop_torn_record(path)
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not a JSON record ({exc.msg}); the run's "
                             "metrics file was changed by hand or by another program") from exc
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
