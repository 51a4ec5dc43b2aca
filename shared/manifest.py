"""What a checkpoint records about itself, and the checks a resume makes against it.

``MANIFEST.json``, written into a checkpoint by ``CheckpointDir.commit`` just before
``COMPLETE``::

    {"format": 1,
     "backend": "torch",                    the backend that wrote it
     "config_sha256": "...",                sha256 of the resolved config (canonical JSON)
     "config": {...},                       the resolved config, so a change names its keys
     "versions": {"python": ..., "numpy": ..., "transformers": ..., "torch": ...},
     "files": {"model/mp_rank_00_model_states.pt": {"size": 1234, "sha256": "..."}, ...}}

``verify_manifest`` refuses a checkpoint of another backend or of another config (naming
the differing keys, dotted, with both values) and names every file that is missing,
truncated or changed (its size, else its sha256); library versions that differ are only
logged. Library versions come from ``importlib.metadata``: nothing here imports torch or jax.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared.config import to_dict

__all__ = ["MANIFEST", "CorruptCheckpointError", "ResumeMismatchError", "backend_hint",
           "config_diff",
           "config_fingerprint", "describe_diff", "hash_file", "hash_files", "library_versions",
           "read_manifest", "verify_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
"""The manifest's file name inside a checkpoint directory."""
FORMAT = 1
_CHUNK = 1 << 20  # bytes hashed per read: memory stays flat for any file size
_SKIPPED = frozenset({MANIFEST, "COMPLETE"})

_COMMON_LIBRARIES = ("numpy", "safetensors", "transformers", "tokenizers")
_BACKEND_LIBRARIES = {"torch": ("torch", "deepspeed", "peft"),
                      "jax": ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}


class ResumeMismatchError(ValueError):
    """A resume refused: the checkpoint or run was written by another backend or under
    another config."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or changed since it was written."""


# --------------------------------------------------------------------------- fingerprints


@functools.cache
def library_versions(backend: str | None = None) -> dict[str, str | None]:
    """Python's and the installed versions of numpy, safetensors, transformers, tokenizers
    and ``backend``'s libraries (torch, deepspeed, peft / jax, jaxlib, flax, optax,
    orbax-checkpoint); None for one that is not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*_COMMON_LIBRARIES, *_BACKEND_LIBRARIES.get(backend or "", ())):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plain_config(config: Any) -> dict[str, Any]:
    """The config as plain data: an ``RLHFConfig`` through ``to_dict``, a mapping as is."""
    data = to_dict(config)
    if not isinstance(data, Mapping):
        raise TypeError(f"config: expected an RLHFConfig or a mapping, got {type(config)}")
    # A JSON round trip: what the manifest holds is what later comparisons see.
    return json.loads(json.dumps(data, default=str))


def config_fingerprint(config: Any) -> tuple[dict[str, Any], str]:
    """``(config as plain data, sha256 of its canonical JSON)``."""
    data = _plain_config(config)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return data, hashlib.sha256(text.encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


_ABSENT = "<absent>"


def config_diff(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where the two configs (or their
    plain-data forms) differ, sorted by key; a key only one side has shows ``<absent>``."""
    a, b = _flatten(_plain_config(old)), _flatten(_plain_config(new))
    return [(key, a.get(key, _ABSENT), b.get(key, _ABSENT)) for key in sorted(a.keys() | b.keys())
            if a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def describe_diff(diff: Iterable[tuple[str, Any, Any]], *, limit: int = 10) -> str:
    """``key: old -> new`` for the first ``limit`` differences, and how many more."""
    diff = list(diff)
    parts = [f"{key}: {old!r} -> {new!r}" for key, old, new in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"and {len(diff) - limit} more")
    return "; ".join(parts)


# --------------------------------------------------------------------------- content


def hash_file(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, sha256 hex digest)`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() not in _SKIPPED)


def hash_files(root: str | os.PathLike, names: Iterable[str] | None = None,
               ) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` (or of ``names``),
    the manifest and marker excepted; files are hashed on a few threads (hashlib releases the
    GIL), a missing one is left out."""
    root = Path(root)
    names = _files(root) if names is None else list(names)

    def one(name: str) -> tuple[str, tuple[int, str] | None]:
        try:
            return name, hash_file(root / name)
        except FileNotFoundError:
            return name, None

    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(one, names))
    return {name: {"size": got[0], "sha256": got[1]} for name, got in hashed if got is not None}


# --------------------------------------------------------------------------- the manifest


def write_manifest(path: str | os.PathLike, *, backend: str, config: Any) -> dict[str, Any]:
    """Write ``MANIFEST.json`` into the checkpoint directory ``path`` (every other file
    already written) and return it."""
    path = Path(path)
    data, digest = config_fingerprint(config)
    manifest = {"format": FORMAT, "backend": backend, "config_sha256": digest, "config": data,
                "versions": library_versions(backend), "files": hash_files(path)}
    partial = path / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path / MANIFEST)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the checkpoint directory ``path``; None when it has none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"checkpoint {path}: {MANIFEST} is not readable JSON "
                                     f"({err}); the checkpoint cannot be verified") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpointError(f"checkpoint {path}: {MANIFEST} has no file list")
    return manifest


def backend_hint(written: str, running: str) -> str:
    """Why a resume on ``running`` of what ``written`` wrote is refused, and what to do."""
    return (f"it was written by the {written} backend and this run uses {running}; "
            "checkpoints do not carry over between backends: resume with "
            f"`--backend {written}`, or start a new run (a finished step's final Hugging Face "
            "model loads in either backend)")


def verify_manifest(path: str | os.PathLike, *, backend: str, config: Any,
                    check_files: bool = True) -> dict[str, Any] | None:
    """Check that the checkpoint ``path`` is one this run can resume from; its manifest
    (None for a checkpoint written before manifests, which is only logged).

    Raises:
      ResumeMismatchError: it was written by another backend, or under another config (the
        message names each differing key with the checkpoint's and this run's value).
      CorruptCheckpointError: a file is missing, has another size or another sha256 than
        when it was written (all such files are named, with both sizes or hashes).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        logger.warning("checkpoint %s has no %s (written before checkpoints recorded one): "
                       "its backend, config and files are not verified", path, MANIFEST)
        return None
    written = manifest.get("backend")
    if written != backend:
        raise ResumeMismatchError(f"cannot resume from checkpoint {path}: "
                                  f"{backend_hint(written, backend)}")
    _, digest = config_fingerprint(config)
    if manifest.get("config_sha256") != digest:
        diff = config_diff(manifest.get("config", {}), config)
        what = describe_diff(diff) or "the config hash differs"
        raise ResumeMismatchError(
            f"cannot resume from checkpoint {path}: the config differs from the one it was "
            f"written under (checkpoint -> now): {what}; resume with the run's config.yaml, "
            "or start a new run")
    _warn_versions(path, manifest.get("versions", {}), library_versions(backend))
    if check_files:
        _check_files(path, manifest["files"])
    return manifest


def _warn_versions(path: Path, written: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    changed = [f"{name} {written[name]} -> {now.get(name)}" for name in sorted(written)
               if written[name] != now.get(name)]
    if changed:
        logger.warning("checkpoint %s was written with other library versions (%s); resuming "
                       "anyway, but the numbers may not match an uninterrupted run", path,
                       ", ".join(changed))


def _check_files(path: Path, expected: Mapping[str, Mapping[str, Any]]) -> None:
    problems = []
    sized = {}
    for name, entry in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing (expected {entry['size']} bytes)")
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            problems.append(f"{file} is truncated or overwritten: {size} bytes, expected "
                            f"{entry['size']}")
        else:
            sized[name] = entry
    for name, got in sorted(hash_files(path, sized).items()):
        want = sized[name]["sha256"]
        if got["sha256"] != want:
            problems.append(f"{path / name} is corrupt: sha256 {got['sha256'][:16]}..., "
                            f"expected {want[:16]}... (same size, {got['size']} bytes)")
    if problems:
        raise CorruptCheckpointError(
            f"checkpoint {path} does not match its {MANIFEST}: " + "; ".join(problems)
            + f". Delete {path} to resume from the checkpoint before it")
    extra = sorted(set(_files(path)) - set(expected))
    if extra:
        logger.warning("checkpoint %s holds files its %s does not list (ignored): %s", path,
                       MANIFEST, ", ".join(extra[:10]))
