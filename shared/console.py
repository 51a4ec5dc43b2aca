"""What a run prints, and where everything else goes.

The console carries this project's own messages (loggers ``rlhf``, ``shared``,
``torch_rlhf``, ``jax_rlhf``, ``parity_tests``, ``bench``) at INFO and above, drawn above the
progress bars; libraries' warnings and chatter (transformers, DeepSpeed, absl/orbax, Python
``warnings``) reach the console only as errors. Every record, the library ones included,
goes to ``<run_dir>/run.log`` as soon as a run directory is known (records from before that
are held and written first). ``--verbose`` puts everything on the console too; ``--quiet``
keeps only warnings and errors.

A record logged with ``extra=FILE_ONLY`` goes to the run log only: the loops use it for
their per-step metric lines between the few the console shows (`console_every`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FILE_ONLY",
    "NORMAL",
    "OWN_LOGGERS",
    "QUIET",
    "RUN_LOG",
    "VERBOSE",
    "attach_run_log",
    "configure",
    "console_every",
    "say_once",
    "stdout_to_log",
    "summary_table",
]

QUIET, NORMAL, VERBOSE = -1, 0, 1
OWN_LOGGERS = ("rlhf", "shared", "torch_rlhf", "jax_rlhf", "parity_tests", "bench", "__main__")
FILE_ONLY = {"console": False}
RUN_LOG = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HELD_RECORDS = 20_000
# Progress bars of the libraries (weights loading, shard writing, dataset maps): off unless
# --verbose; the run's own bars say where it is.
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


def _own(name: str) -> bool:
    return name.split(".", 1)[0] in OWN_LOGGERS


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbosity: int):
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= VERBOSE:
            return True
        if getattr(record, "console", True) is False:
            return False
        if not _own(record.name):
            return record.levelno >= logging.ERROR
        return record.levelno >= (logging.WARNING if self.verbosity <= QUIET else logging.INFO)


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors say their level; `VERBOSE` names the
    logger too."""

    def __init__(self, *, verbose: bool):
        super().__init__(datefmt="%H:%M:%S")
        full = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
        self.info = full if verbose else logging.Formatter("%(asctime)s %(message)s",
                                                           datefmt="%H:%M:%S")
        self.warning = full if verbose else logging.Formatter(
            "%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return (self.warning if record.levelno >= logging.WARNING else self.info).format(record)


class _ConsoleHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a message lands above the progress bars instead of
    breaking one in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


class _RunLogHandler(logging.Handler):
    """Holds records until `attach` names the file, then writes them and all later ones."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.held: deque[logging.LogRecord] = deque(maxlen=_HELD_RECORDS)
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(_FORMAT))

    def attach(self, path: Path) -> None:
        if self.file is not None and Path(self.file.baseFilename) == path.resolve():
            return
        if self.file is not None:
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        while self.held:
            self.file.emit(self.held.popleft())

    def detach(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.held.append(record)
        else:
            self.file.emit(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


_state: dict[str, Any] = {}


def configure(verbosity: int = NORMAL, *, stream=None) -> None:
    """Sets up the console and the run log (idempotent: a second call changes verbosity).

    Adds two handlers to the root logger (others, such as a test harness's, stay), routes
    Python warnings and the transformers library's own handler through logging, and turns
    library progress bars off unless ``verbosity`` is `VERBOSE`."""
    root = logging.getLogger()
    if _state.get("console") in root.handlers:
        root.removeHandler(_state["console"])
    console = _ConsoleHandler(stream if stream is not None else sys.stderr)
    console.setFormatter(_ConsoleFormatter(verbose=verbosity >= VERBOSE))
    console.addFilter(_ConsoleFilter(verbosity))
    root.addHandler(console)
    run_log = _state.setdefault("run_log", _RunLogHandler())
    run_log.detach()  # a new command: hold its records until it names its run directory
    if run_log not in root.handlers:
        root.addHandler(run_log)
    root.setLevel(logging.DEBUG if verbosity >= VERBOSE else logging.INFO)
    _state.update(console=console, verbosity=verbosity)
    logging.captureWarnings(True)
    if verbosity < VERBOSE:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
    route_library_loggers()


def route_library_loggers() -> None:
    """Libraries that print through handlers of their own (transformers, DeepSpeed) are made
    to pass their records to the root logger instead, so the filter above applies. Call it
    again after importing such a library."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    for name in ("DeepSpeed",):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True


def attach_run_log(run_dir: str | Path) -> Path | None:
    """Starts writing ``<run_dir>/run.log`` (what was logged before is written first);
    returns its path, or None when `configure` was not called (a library caller)."""
    handler = _state.get("run_log")
    if handler is None:
        return None
    path = Path(run_dir) / RUN_LOG
    handler.attach(path)
    return path


class _LogWriter(io.TextIOBase):
    def __init__(self, log: logging.Logger):
        self.log, self.pending = log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.log.info("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.log.info("%s", self.pending.rstrip())
        self.pending = ""


@contextlib.contextmanager
def stdout_to_log(name: str) -> Iterator[None]:
    """Sends what a library ``print``s to standard output inside the block to logger
    ``name`` (so to the run log, not the console, and never into piped results)."""
    if _state.get("verbosity", VERBOSE) >= VERBOSE:
        yield
        return
    writer = _LogWriter(logging.getLogger(name))
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.flush()


_said: set[str] = set()


def say_once(log: logging.Logger, level: int, msg: str, *args: Any,
             console: bool = True) -> None:
    """Logs a one-time fact (a rollout path, a fallback) once per process: the first time
    it is true (on the console unless ``console`` is false, and in the run log), never
    again."""
    text = msg % args if args else msg
    if text not in _said:
        _said.add(text)
        log.log(level, "%s", text, extra=None if console else FILE_ONLY)


def console_every(total: int, *, log_interval: int, lines: int) -> int:
    """Steps between the per-step metric lines the console shows: about ``lines`` of them
    over ``total`` steps, on multiples of ``log_interval`` (every logged line still goes to
    the run log)."""
    if lines <= 0:
        return 0
    every = max(1, math.ceil(total / lines))
    return math.ceil(every / log_interval) * log_interval


# ----------------------------------------------------------------- the closing table

_STEP_FIGURES = {
    "sft": ("eval_loss", "eval_perplexity"),
    "reward": ("eval_accuracy", "eval_chosen_score", "eval_rejected_score"),
    "dpo": ("eval_loss", "eval_reward_accuracy", "eval_margin"),
    "ppo": ("final_reward", "final_kl"),
}


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _heldout(entry: Mapping[str, Any] | None) -> str:
    heldout = (entry or {}).get("heldout") or {}
    if not heldout:
        return "-"
    return " / ".join(_figure(heldout[k]) for k in sorted(heldout))


def summary_table(summary: Mapping[str, Any], run_dir: str | Path) -> str:
    """The plain-text table a run ends with: per step its wall time, steps, final figures and
    the held-out metric before and after (before: the step that produced its starting
    model, where this run has it), then where the outputs are."""
    steps = [s for s in ("sft", "reward", "dpo", "ppo") if isinstance(summary.get(s), Mapping)]
    heldout_keys = sorted({k for s in steps for k in (summary[s].get("heldout") or {})})
    rows = [("step", "time", "steps", "final", "held-out " + " / ".join(heldout_keys)
             if heldout_keys else "held-out")]
    previous_policy = None
    for step in steps:
        entry = summary[step]
        seconds = (entry.get("timings") or {}).get("wall_time")
        count = entry.get("steps", entry.get("iterations", "-"))
        figures = ", ".join(f"{k.removeprefix('eval_').removeprefix('final_')} "
                            f"{_figure(entry[k])}" for k in _STEP_FIGURES.get(step, ())
                            if k in entry)
        heldout = _heldout(entry)
        if step in ("ppo", "dpo") and previous_policy is not None and heldout != "-":
            heldout = f"{_heldout(previous_policy)} -> {heldout}"
        rows.append((step, "-" if seconds is None else f"{seconds:.0f}s", str(count),
                     figures or "-", heldout))
        if step != "reward":
            previous_policy = entry
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    run_dir = Path(run_dir)
    lines.append(f"outputs: {run_dir}  (summary.json, metrics.jsonl, {RUN_LOG}, plots/, "
                 "tensorboard/)")
    for step in steps:
        model = summary[step].get("final_model")
        if model:
            lines.append(f"  {step} model: {model}")
    return "\n".join(lines)
