"""One writer per run directory: ``<run>/.lock`` names the process that owns the run.

A training command (``shared.pipeline``) holds the lock of its run directory from start to
end, on the main process only. The lock is two things:

- an exclusive ``flock`` on ``<run>/.lock``, which the kernel drops when the process dies
  however it dies, and which makes a second run fail at once;
- the owner record written into that file: ``{"pid", "host", "started", "command"}``, which
  the refusal names, and which is cleared (the file left empty) when the run ends.

A record left behind by a process that no longer holds the lock (killed, or the machine
restarted) is stale: on the same host (the pid is dead, or the flock is free) it is taken
over with a warning. A record from another host whose flock this host cannot see (a network
file system without locks) cannot be checked from here: the run is refused, and the message
says to delete the file once that run is known to be gone. On a file system without
``flock`` only the record protects the directory. Nothing here imports torch or jax.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: only the owner record protects the directory
    fcntl = None

__all__ = ["LOCK_FILE", "RunDirLock", "RunDirLockedError", "check_run_dir_free", "hold_run_dir",
           "lock_owner"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock file's name inside the run directory."""

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


class RunDirLockedError(RuntimeError):
    """Another live run owns the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": None, "host": None, "started": None, "command": text.strip()[:200]}
    return record if isinstance(record, dict) else None


def lock_owner(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The owner record in ``<run_dir>/.lock`` (None when there is none); it may be stale."""
    return _read_record(Path(run_dir) / LOCK_FILE)


def _describe(record: dict[str, Any]) -> str:
    text = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("started"):
        text += f", since {record['started']}"
    if record.get("command"):
        text += f", running `{record['command']}`"
    return text


class RunDirLock:
    """The lock of one run directory (see the module docstring).

    Args:
      run_dir: the run directory (created when missing).
      command: what the owner runs, recorded for the refusal message (default: ``sys.argv``).
    """

    def __init__(self, run_dir: str | os.PathLike, *, command: str | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.command = command if command is not None else " ".join(
            [Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        self._fd: int | None = None
        self._record: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise :class:`RunDirLockedError` naming the live owner."""
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = self._flock(fd)
            previous = _read_record(self.path)
            if previous is not None:
                self._check_stale(previous, flocked)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._record = fd, record
        return self

    def _flock(self, fd: int) -> bool:
        """Whether the flock was taken (False where the file system has none)."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal(_read_record(self.path)) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            logger.warning("%s: the file system does not support locks (%s); only the owner "
                           "record guards the run directory", self.path, err.strerror)
            return False
        return True

    def _check_stale(self, previous: dict[str, Any], flocked: bool) -> None:
        pid, host = previous.get("pid"), previous.get("host")
        here = socket.gethostname()
        if host != here or not isinstance(pid, int):
            if host is None or not isinstance(pid, int):
                logger.warning("%s holds an unreadable owner record; taking the lock over",
                               self.path)
                return
            raise RunDirLockedError(
                f"run directory {self.run_dir} is locked by {_describe(previous)}; this host "
                f"({here}) cannot check whether that run still lives: wait for it to end, or, "
                f"once it is known to be gone, delete {self.path}")
        alive = _pid_alive(pid)
        if alive and not flocked and pid != os.getpid():
            raise self._refusal(previous)
        reason = "is no longer running" if not alive else "does not hold the lock any more"
        logger.warning("run directory %s: taking over the stale lock of %s, which %s "
                       "(killed or crashed)", self.run_dir, _describe(previous), reason)

    def _refusal(self, owner: dict[str, Any] | None) -> RunDirLockedError:
        who = _describe(owner) if owner else "another process"
        return RunDirLockedError(
            f"run directory {self.run_dir} is in use by {who}: one run writes a run "
            "directory at a time; wait for it to end, or choose another --run-dir")

    def release(self) -> None:
        """Clear the owner record and drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _read_record(self.path) == self._record:
                os.ftruncate(fd, 0)
        except OSError as err:  # the run's outputs matter more than a stale record
            logger.warning("could not clear %s: %s", self.path, err)
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, tuple[RunDirLock, int]] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike, *, is_main: bool = True,
                 command: str | None = None) -> Iterator[RunDirLock | None]:
    """Hold the lock of ``run_dir`` for the ``with`` block, on the main process only (None
    elsewhere). Re-entrant within a process: a pipeline holds it around its steps, each step
    again; the outermost block releases it."""
    if not is_main:
        yield None
        return
    key = Path(run_dir).resolve()
    with _HELD_GUARD:
        lock, depth = _HELD.get(key, (None, 0))
        if lock is None:
            lock = RunDirLock(run_dir, command=command).acquire()
        _HELD[key] = (lock, depth + 1)
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            lock, depth = _HELD.pop(key)
            if depth > 1:
                _HELD[key] = (lock, depth - 1)
            else:
                lock.release()


def check_run_dir_free(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunDirLockedError` when another live run owns ``run_dir`` (a stale
    record is taken over and cleared on the way); the lock is not kept. A no-op for a
    directory that does not exist yet or that this process holds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    with _HELD_GUARD:
        if run_dir.resolve() in _HELD:
            return
    RunDirLock(run_dir).acquire().release()
