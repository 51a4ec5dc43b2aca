"""Exported models are read back before anyone uses them.

``verify_export(directory)`` re-reads every ``*.safetensors`` file of a Hugging Face
directory the loops just wrote (``<run>/<step>/final``, PPO's ``critic`` and ``ema``): the
header through ``safetensors.safe_open`` (which refuses a truncated file or one whose header
does not cover it), the tensors a sharded index names, and every floating-point tensor for
NaN and infinity; a ``tokenizer.json`` must load, and a final directory must carry its
tokenizer, model card and generation config (``complete=True``). A bad export is moved
aside to ``<name>.rejected`` (so no later step or ``--resume`` takes it for a final model)
and :class:`ExportError` names the file and the tensor. Tensors are read one at a time;
nothing here imports torch or jax.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from shared.model_card import GENERATION_CONFIG, MODEL_CARD, is_causal_lm

__all__ = ["ExportError", "verify_export"]

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"

# The exponent bits of each float dtype: a value is NaN or infinite exactly when they are all
# set (float8 e4m3 has no infinity; its NaN is every bit but the sign set).
_EXPONENT_BITS = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                  "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                  "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}
_NUMPY_FLOATS = {"F64", "F32", "F16"}


class ExportError(RuntimeError):
    """An exported model that must not be used: unreadable, incomplete or non-finite."""


def _header(file: Path) -> tuple[dict, int]:
    """The safetensors JSON header (tensor -> dtype, shape, data_offsets) and where the data
    starts: 8 bytes of header length, then the header."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def _raw_nonfinite(file: Path, name: str, dtype: str) -> int:
    """How many NaN / infinite values tensor ``name`` (of a dtype numpy cannot represent:
    bf16, float8) holds, from its bits."""
    header, data_start = _header(file)
    start, end = header[name]["data_offsets"]
    unsigned, mask = _EXPONENT_BITS[dtype]
    count = (end - start) // np.dtype(unsigned).itemsize
    if count == 0:
        return 0
    bits = np.memmap(file, dtype=unsigned, mode="r", offset=data_start + start, shape=(count,))
    return int(np.count_nonzero((bits & unsigned(mask)) == mask))


def _check_file(file: Path) -> tuple[int, list[str]]:
    """(tensors, problems) of one safetensors file."""
    problems = []
    try:
        handle = safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        return 0, [f"{file} is unreadable or truncated ({err})"]
    with handle as f:
        names = list(f.keys())
        for name in names:
            dtype = f.get_slice(name).get_dtype()
            if dtype in _NUMPY_FLOATS:
                bad = int(np.count_nonzero(~np.isfinite(f.get_tensor(name))))
            elif dtype in _EXPONENT_BITS:
                bad = _raw_nonfinite(file, name, dtype)
            else:  # integer and boolean tensors are always finite
                continue
            if bad:
                shape = f.get_slice(name).get_shape()
                problems.append(f"{file}: tensor {name} ({dtype} {shape}) has {bad} NaN or "
                                "infinite values")
    return len(names), problems


def _check_companions(directory: Path, *, complete: bool) -> list[str]:
    """Problems of the files beside the weights: a ``tokenizer.json`` must load (with the
    ``tokenizers`` library, milliseconds); with ``complete``, the tokenizer, the model card
    and (a causal LM) ``generation_config.json`` must be there."""
    problems = []
    fast = directory / "tokenizer.json"
    if fast.is_file():
        try:
            Tokenizer.from_file(str(fast))
        except Exception as err:  # the Rust library raises a bare Exception
            problems.append(f"{fast} does not load as a tokenizer ({err})")
    if not complete:
        return problems
    if not (directory / "tokenizer_config.json").is_file():
        problems.append(f"{directory} carries no tokenizer (tokenizer_config.json)")
    if not (directory / MODEL_CARD).is_file():
        problems.append(f"{directory} carries no model card ({MODEL_CARD})")
    config = directory / "config.json"
    if not config.is_file():
        return [*problems, f"{directory} carries no config.json"]
    if is_causal_lm(json.loads(config.read_text())) \
            and not (directory / GENERATION_CONFIG).is_file():
        problems.append(f"{directory} carries no {GENERATION_CONFIG} (a causal LM)")
    return problems


def verify_export(directory: str | os.PathLike, *, reject: bool = True,
                  complete: bool = False) -> dict[str, int]:
    """Check the Hugging Face directory ``directory`` just written; ``{file: tensors}``.

    Every ``*.safetensors`` file must open (header complete, data covered), every tensor a
    ``model.safetensors.index.json`` maps must be in the file it names, and every floating
    point tensor must be finite; a ``tokenizer.json`` must load. With ``complete`` (the
    loops' final directories) the tokenizer, ``config.json``, the model card ``README.md``
    and, for a causal LM, ``generation_config.json`` must be there
    (``shared.model_card.complete_export``). A directory without safetensors weights is
    only logged.

    Raises:
      ExportError: naming each bad file and tensor; with ``reject`` the directory is first
        renamed ``<directory>.rejected`` (replacing an earlier one).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"export {directory} was not written (no such directory)")
    files = sorted(directory.glob("*.safetensors"))
    counts: dict[str, int] = {}
    problems: list[str] = []
    for file in files:
        counts[file.name], bad = _check_file(file)
        problems += bad
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for name, shard in sorted(weight_map.items()):
            if not (directory / shard).is_file():
                problems.append(f"{directory / shard} is missing (the index maps {name} to it)")
            elif counts.get(shard) and name not in _header(directory / shard)[0]:
                problems.append(f"{directory / shard} lacks tensor {name} (the index maps it "
                                "there)")
    problems += _check_companions(directory, complete=complete)
    if not files:
        logger.warning("export %s holds no *.safetensors file: its weights are not verified",
                       directory)
    if problems:
        shown = "; ".join(problems[:10])
        if len(problems) > 10:
            shown += f"; and {len(problems) - 10} more"
        message = f"the exported model {directory} must not be used: {shown}"
        if reject:
            rejected = directory.with_name(directory.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            directory.rename(rejected)
            message += f". It was moved to {rejected}"
        raise ExportError(message)
    logger.info("export %s verified: %d tensors in %d safetensors files, all finite", directory,
                sum(counts.values()), len(files))
    return counts
