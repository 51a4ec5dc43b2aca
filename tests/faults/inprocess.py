"""The ``rlhf`` command in the test process (``shared.cli.main``), so that a test can
monkeypatch a backend to inject a fault, and what it reported."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from shared import cli


@dataclasses.dataclass
class Outcome:
    status: int
    errors: list[logging.LogRecord]
    warnings: list[logging.LogRecord]

    @property
    def message(self) -> str:
        return self.errors[0].getMessage() if self.errors else ""


def rlhf_main(argv: list[str], caplog) -> Outcome:
    """``rlhf ARGV`` in this process; its exit status and the records it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = cli.main(argv)
    records = caplog.records
    return Outcome(status, [r for r in records if r.levelno >= logging.ERROR],
                   [r for r in records if r.levelno == logging.WARNING])


def assert_one_line(outcome: Outcome, status: int, *words: str) -> str:
    """Exit ``status``, exactly one ERROR record, one line, no traceback attached."""
    assert outcome.status == status, (outcome.status, [r.getMessage() for r in outcome.errors])
    assert len(outcome.errors) == 1, [r.getMessage() for r in outcome.errors]
    record = outcome.errors[0]
    assert record.exc_info is None, "a traceback was printed"
    message = record.getMessage()
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message


def command_argv(command: str, config: Path, backend: str, run_dir: Path, *,
                 resume: bool = False) -> list[str]:
    argv = [command, "--config", str(config), "--backend", backend, "--run-dir", str(run_dir)]
    return [*argv, "--resume"] if resume else argv


def poisoned(array, value: float) -> np.ndarray:
    """A float32 copy of ``array`` with ``value`` in its first element."""
    out = np.array(array, dtype=np.float32, copy=True)
    out.reshape(-1)[0] = value
    return out
