"""What the ``rlhf`` command reports as one line, and with which exit status.

The failures a user can cause or meet are classes the code raises::

    RLHFError                  the base; never raised itself
    +-- InputError       (2)   bad input: config, data, arguments, a missing or invalid model,
    |   |                      tokenizer or checkpoint (also a ValueError). ConfigError,
    |   |                      shared.data's DataError and the JAX CheckpointMismatchError are
    |   |                      InputErrors.
    |   +-- ModelSourceError   a model or tokenizer that is neither a local directory nor a
    |                          Hugging Face Hub name that can be had (cached, or Hub reachable)
    +-- RunError         (1)   a run that started and then failed (also a RuntimeError)
    +-- Interrupted    (130)   Ctrl-C; names the run directory, which keeps what was written

:func:`describe` turns any exception into a :class:`Failure` (exit status and one line), the
library exceptions included (OS errors, decoding, safetensors, Hugging Face Hub); ``None``
for an unexpected exception, a bug, which the command prints with its traceback.
:func:`check_model_source` fails fast, before any framework is imported, on a model or
tokenizer that cannot be loaded, instead of the Hub client's minutes of retries.

Nothing here imports torch, jax, transformers or huggingface_hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_RUN",
    "Failure",
    "InputError",
    "Interrupted",
    "ModelSourceError",
    "RLHFError",
    "RunError",
    "check_model_source",
    "describe",
    "hub_offline",
    "hub_reachable",
    "is_hub_name",
    "loading",
    "one_line",
    "process_count",
    "process_rank",
]

EXIT_RUN = 1
"""A run that failed after it started (also an unexpected exception)."""
EXIT_INPUT = 2
"""Bad input: config, data, arguments, model, tokenizer or checkpoint (argparse's status)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT, as shells report it."""

HUB_PROBE_TIMEOUT_S = 3.0
"""How long :func:`check_model_source` waits for a connection to the Hub (or proxy)."""


class RLHFError(Exception):
    """An expected failure: the command prints ``str(error)`` alone and exits ``exit_code``."""

    exit_code = EXIT_RUN


class InputError(RLHFError, ValueError):
    """Bad input (config, data, arguments, model, tokenizer, checkpoint); exit status 2."""

    exit_code = EXIT_INPUT


class ModelSourceError(InputError):
    """A model or tokenizer that cannot be found: a missing local directory, or a Hub name
    that is neither cached nor reachable; the message says what was looked for."""


class RunError(RLHFError, RuntimeError):
    """A run that started and failed (non-finite stop, a failing step); exit status 1."""

    exit_code = EXIT_RUN


class Interrupted(RLHFError):
    """Ctrl-C (a KeyboardInterrupt), with the run directory it leaves; exit status 130."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, run_dir: str | os.PathLike | None = None, command: str | None = None):
        self.run_dir = run_dir
        message = "interrupted"
        if run_dir is not None:
            latest = _latest_checkpoint(Path(run_dir))
            message += (f"; {run_dir} keeps what was written so far (latest checkpoint: "
                        f"{latest or 'none yet'})")
            if command is not None:
                message += (f"; continue with the same `rlhf {command}` command plus "
                            f"`--resume --run-dir {run_dir}`")
        super().__init__(message)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of any step of the run (``shared.checkpoints``)."""
    from shared.checkpoints import COMPLETE

    with contextlib.suppress(OSError):
        done = [marker.parent for marker in run_dir.glob(f"*/checkpoints/*/{COMPLETE}")]
        if done:
            return max(done, key=lambda path: (path / COMPLETE).stat().st_mtime)
    return None


@dataclasses.dataclass(frozen=True)
class Failure:
    """How the command reports an exception: its exit status and one line."""

    exit_code: int
    message: str


# --------------------------------------------------------------------------- the mapping


def describe(exc: BaseException) -> Failure | None:
    """The exit status and one-line message of ``exc``; None when it is unexpected (a bug).

    ============================================  ====  =======================================
    exception                                     exit  message
    ============================================  ====  =======================================
    RLHFError (ConfigError, DataError, ...)       its   ``str(exc)``
    KeyboardInterrupt                             130   interrupted
    FileNotFoundError, NotADirectoryError,        2     ``<file>: no such file or directory``
    IsADirectoryError
    PermissionError reading a file                2     ``<file>: permission denied (reading)``
    PermissionError writing, EROFS                1     ``cannot write <file>: ...``
    OSError ENOSPC / EDQUOT (disk full)           1     ``no space left on device writing ...``
    other OSError with an errno (EIO, ...)        1     ``<file>: <strerror>``
    UnicodeDecodeError                            2     ``<file>: not UTF-8 text (...)``
    json.JSONDecodeError                          2     ``<file>: invalid JSON at line L ...``
    safetensors SafetensorError                   2     ``<file>: corrupt or unreadable ...``
    huggingface_hub errors, transformers'         2     the model's name, with the offline
    OSErrors loading a model                            hint where the Hub was unreachable
    MemoryError, torch/JAX out-of-memory          1     ``out of memory: ...``
    ValueError raised by this project's code      2     ``str(exc)``
    RuntimeError raised by this project's code    1     ``str(exc)``
    anything else                                 None  (the caller prints the traceback)
    ============================================  ====  =======================================

    ``<file>`` is the exception's own file name, else the nearest file a frame of its
    traceback was working on (for decode errors, which carry none).
    """
    if isinstance(exc, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted")
    if isinstance(exc, RLHFError):
        return Failure(exc.exit_code, one_line(str(exc)))
    hub = _hub_failure(exc)
    if hub is not None:
        return hub
    if isinstance(exc, UnicodeDecodeError):
        where = _traceback_file(exc) or "a file"
        return Failure(EXIT_INPUT, f"{where}: not UTF-8 text ({exc.reason} at byte "
                                   f"{exc.start}); convert it to UTF-8")
    if isinstance(exc, json.JSONDecodeError):
        where = _traceback_file(exc) or "a file"
        return Failure(EXIT_INPUT, f"{where}: invalid JSON at line {exc.lineno} column "
                                   f"{exc.colno}: {exc.msg}")
    if type(exc).__name__ == "SafetensorError":
        where = _traceback_file(exc) or "a safetensors file"
        return Failure(EXIT_INPUT, f"{where}: corrupt or unreadable safetensors file "
                                   f"({one_line(str(exc))})")
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return _os_failure(exc)
        if _raised_here(exc):  # e.g. FileNotFoundError("no complete checkpoint in ...")
            missing = isinstance(exc, (FileNotFoundError, NotADirectoryError,
                                       IsADirectoryError))
            return Failure(EXIT_INPUT if missing else EXIT_RUN, one_line(str(exc)))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
            "RESOURCE_EXHAUSTED" in str(exc)[:200]):
        return Failure(EXIT_RUN, f"out of memory: {one_line(str(exc), limit=300)}; lower the "
                                 "per-device batch sizes or the sequence lengths")
    if _raised_here(exc):
        if isinstance(exc, ValueError):
            return Failure(EXIT_INPUT, one_line(str(exc)))
        if isinstance(exc, RuntimeError) and not isinstance(exc, NotImplementedError):
            return Failure(EXIT_RUN, one_line(str(exc)))
    return None


def one_line(text: str, *, limit: int = 800) -> str:
    """``text`` as one line: its lines joined by "; ", cut at ``limit`` characters."""
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = "; ".join(parts) or "(no message)"
    if len(line) > limit:
        line = line[:limit].rstrip() + " ... (--debug prints all of it)"
    return line


def _os_failure(exc: OSError) -> Failure:
    name = exc.filename if exc.filename is not None else _traceback_file(exc)
    where = f"{os.fsdecode(name)}" if name is not None else "a file"
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return Failure(EXIT_RUN, f"no space left on device writing {where} (outputs written "
                                 "so far are kept); free space or choose another output_dir")
    if exc.errno == errno.EROFS:
        return Failure(EXIT_RUN, f"cannot write {where}: read-only file system; choose a "
                                 "writable output_dir or --run-dir")
    if exc.errno in (errno.EACCES, errno.EPERM):
        if name is not None and _is_read_failure(os.fsdecode(name)):
            return Failure(EXIT_INPUT, f"{where}: permission denied (cannot read it)")
        return Failure(EXIT_RUN, f"cannot write {where}: permission denied; choose a "
                                 "writable output_dir or --run-dir")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return Failure(EXIT_INPUT, f"{where}: {reason}")
    return Failure(EXIT_RUN, f"{where}: {reason}")


def _is_read_failure(name: str) -> bool:
    # A permission error on something that exists and cannot be read is bad input; one on
    # something to be created, or a directory we cannot write into, is a run-time failure.
    path = Path(name)
    if path.is_file():
        return not os.access(path, os.R_OK)
    if path.is_dir():
        return not os.access(path, os.R_OK | os.X_OK) and os.access(path, os.W_OK)
    return False


_HUB_UNREACHABLE = ("couldn't connect", "could not connect", "offline mode", "offline",
                    "connection", "timed out", "max retries", "name or service not known")


def _hub_failure(exc: BaseException) -> Failure | None:
    """Errors of huggingface_hub, and transformers' OSErrors wrapping them."""
    chain = list(_chain(exc))
    hub = [e for e in chain if type(e).__module__.split(".")[0] == "huggingface_hub"]
    from_transformers = (isinstance(exc, OSError) and exc.errno is None
                         and _raise_site(exc).startswith(("transformers", "huggingface_hub")))
    if not hub and not from_transformers:
        return None
    names = {type(e).__name__ for e in chain}
    text = one_line(str(exc), limit=400)
    if "HFValidationError" in names:
        # transformers took a path that does not exist for a Hub name and could not parse it.
        match = re.search(r": '([^']*)'\.? Use", str(hub[0]) if hub else str(exc))
        name = match.group(1) if match else None
        if name is not None:
            return Failure(EXIT_INPUT, f"model directory {name} does not exist")
        return Failure(EXIT_INPUT, text)
    lowered = " ".join(str(e) for e in chain).lower()
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or any(
            s in lowered for s in _HUB_UNREACHABLE):
        name = _traceback_hub_name(exc)
        target = f" for {name}" if name else ""
        if hub_offline():
            return Failure(EXIT_INPUT, f"HF_HUB_OFFLINE is set and the Hugging Face cache "
                                       f"({_hub_cache()}) does not hold what is needed{target}; "
                                       "pass a local directory")
        return Failure(EXIT_INPUT, f"could not reach the Hugging Face Hub{target} (and it is "
                                   "not in the local cache); pass a local directory or set "
                                   "HF_HUB_OFFLINE=1 with the model cached")
    return Failure(EXIT_INPUT, text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _frames(exc: BaseException):
    """The frames of ``exc``'s traceback, innermost first."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _raise_site(exc: BaseException) -> str:
    """The module (dotted, from the file path) where ``exc`` was raised; "" when unknown."""
    for frame in _frames(exc):
        return frame.f_globals.get("__name__", "") or ""
    return ""


_OWN_PACKAGES = ("shared", "torch_rlhf", "jax_rlhf", "parity_tests", "bench")


def _raised_here(exc: BaseException) -> bool:
    """Whether this project's code raised ``exc`` (deliberately, with its own message)."""
    return _raise_site(exc).split(".")[0] in _OWN_PACKAGES


_FILE_LOCALS = ("filename", "file", "path", "fname", "checkpoint_file",
                "resolved_archive_file", "name_or_path", "pretrained_model_name_or_path")


def _traceback_file(exc: BaseException) -> str | None:
    """The innermost existing file a frame of the traceback held in a local named as above."""
    for frame in _frames(exc):
        for key in _FILE_LOCALS:
            value = frame.f_locals.get(key)
            if isinstance(value, (str, os.PathLike)):
                try:
                    if os.path.exists(value):
                        return os.fspath(value)
                except (TypeError, ValueError, OSError):
                    continue
    return None


def _traceback_hub_name(exc: BaseException) -> str | None:
    for e in _chain(exc):
        for frame in _frames(e):
            for key in ("repo_id", "path_or_repo_id", "pretrained_model_name_or_path"):
                value = frame.f_locals.get(key)
                if isinstance(value, str):
                    return value
    return None


# --------------------------------------------------------------------------- model sources

_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub repo id (``name`` or
    ``namespace/name``) rather than only a path."""
    return (bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name
            and not name.startswith((".", "-")) and not name.endswith((".", "-")))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def _hub_cached(name: str) -> bool:
    snapshots = _hub_cache() / ("models--" + name.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@functools.cache
def _reachable(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts; a thread bounds the whole probe.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_reachable() -> bool:
    """Whether one connection to the Hub (or the HTTPS_PROXY) succeeds within 3 s (cached)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                          "all_proxy") if os.environ.get(v)), None)
    url = urllib.parse.urlsplit(proxy or endpoint)
    if not url.hostname:
        return True  # an endpoint we cannot parse: let the Hub client decide
    port = url.port or (443 if url.scheme == "https" else 80)
    return _reachable(url.hostname, port, HUB_PROBE_TIMEOUT_S)


def check_model_source(name_or_path: str | os.PathLike, *, what: str = "model") -> str:
    """Raises :class:`ModelSourceError` naming what was looked for when ``name_or_path`` can
    be loaded neither as a local directory nor from the Hugging Face Hub; returns how it
    will be loaded: ``"local"``, ``"cache"`` or ``"hub"``.

    A Hub name that is not cached is checked by one connection to the Hub (or the proxy of
    HTTPS_PROXY) with a 3 s timeout, so a machine without network fails in seconds instead
    of the Hub client's retries; with HF_HUB_OFFLINE set, not at all.

    Args:
      name_or_path: a local directory or a Hub name (``gpt2``, ``facebook/opt-1.3b``).
      what: named in the message ("model", "tokenizer", "actor model", ...).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{what} {text} is a file; expected a Hugging Face model "
                                   "directory (config.json and weights) or a Hub name")
        if what == "model" and not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {text} has no config.json: not a Hugging "
                                   "Face model directory")
        return "local"
    if not is_hub_name(text):
        raise ModelSourceError(f"{what} directory {text} does not exist")
    if _hub_cached(text):
        return "cache"
    here = f"no local directory {path.absolute()}"
    if hub_offline():
        raise ModelSourceError(f"{what} {text}: {here}, and HF_HUB_OFFLINE is set but it is "
                               f"not in the Hugging Face cache ({_hub_cache()}); pass a local "
                               "directory")
    if not hub_reachable():
        raise ModelSourceError(f"could not reach the Hugging Face Hub for {what} {text} "
                               f"({here} either); pass a local directory or set "
                               "HF_HUB_OFFLINE=1 with the model cached")
    return "hub"


@contextlib.contextmanager
def loading(what: str, name_or_path: str | os.PathLike) -> Iterator[None]:
    """Turns a library's failure to load ``name_or_path`` (transformers OSErrors and
    ValueErrors, Hub errors, corrupt safetensors or JSON files) into an :class:`InputError`
    naming it."""
    try:
        yield
    except RLHFError:
        raise
    except Exception as err:
        failure = describe(err)
        if failure is None and isinstance(err, (ValueError, KeyError)):
            # transformers' "Unrecognized model in DIR", a config.json without a key, ...
            failure = Failure(EXIT_INPUT, one_line(str(err).strip("'\"")))
        if failure is None or failure.exit_code != EXIT_INPUT:
            raise
        name = os.fspath(name_or_path)
        message = failure.message if name in failure.message else \
            f"{what} {name}: {failure.message}"
        raise InputError(message) from err


# --------------------------------------------------------------------------- processes


def process_count() -> int:
    """The processes of this run (1 when alone): torchrun / deepspeed's WORLD_SIZE, else the
    JAX process count once ``jax.distributed`` is up."""
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    jax = sys.modules.get("jax")
    if jax is not None:
        with contextlib.suppress(Exception):
            if jax.distributed.is_initialized():
                return int(jax.process_count())
    return 1


def process_rank() -> int:
    """This process's rank in a multi-process run (0 when alone): torchrun / deepspeed's
    RANK, else the JAX process index once ``jax.distributed`` is up."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    jax = sys.modules.get("jax")
    if jax is not None:
        with contextlib.suppress(Exception):
            if jax.distributed.is_initialized():
                return int(jax.process_index())
    return 0
