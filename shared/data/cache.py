"""On-disk cache of tokenised arrays: one .npz per (step, content hash).

The key hashes the datasets' content (file bytes for local files and directories, the
`datasets` fingerprint for hub datasets), the tokenizer's fingerprint, the data config and
`CACHE_VERSION`; any change to one of them misses the cache. Files are written atomically
(temporary file + rename), and hold only numeric and unicode arrays (no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np

from shared.data.batches import BATCH_TYPES, ArrayBatch
from shared.data.records import DataReport

CACHE_VERSION = 2
"""Bump when the arrays this layer produces change for the same inputs."""


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or of a directory's relative paths and file bytes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                h.update(file_digest(full).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: Mapping[str, object]) -> str:
    """Hash of a JSON-serialisable description of everything the arrays depend on."""
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def save(path: str, batches: Mapping[str, ArrayBatch | None], report: DataReport) -> None:
    """Writes named batches (None entries are skipped) and the report to `path`."""
    arrays: dict[str, np.ndarray] = {"report": np.array(report.to_json())}
    for name, batch in batches.items():
        if batch is None:
            continue
        arrays[f"{name}.type"] = np.array(type(batch).__name__)
        for field, value in batch.arrays().items():
            arrays[f"{name}.{field}"] = value
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str, names: tuple[str, ...]) -> tuple[dict[str, ArrayBatch | None], DataReport]:
    """Reads what `save` wrote: the named batches (None where absent) and the report."""
    with np.load(path, allow_pickle=False) as npz:
        report = DataReport.from_json(str(npz["report"]))
        batches: dict[str, ArrayBatch | None] = {}
        for name in names:
            if f"{name}.type" not in npz:
                batches[name] = None
                continue
            cls = BATCH_TYPES[str(npz[f"{name}.type"])]
            prefix = f"{name}."
            batches[name] = cls.from_arrays(
                {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)}
            )
    return batches, report
