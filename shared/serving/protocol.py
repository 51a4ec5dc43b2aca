"""The wire format of the served roles (NeMo-RLHF's reward model, initial policy and critic
servers; docs/serving.md): JSON bodies whose arrays travel as base64 of their raw bytes, so a
float32 arrives bit for bit and a client of one backend can use a server of the other.

Every response carries the server's ``identity``: its role, backend, model and the SHA-256 of
its tokenizer's vocabulary, which a client compares with its own before it trusts a number.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "ENDPOINTS",
    "ConflictError",
    "ROLES",
    "ProtocolError",
    "decode_array",
    "decode_arrays",
    "encode_array",
    "encode_arrays",
    "tokenizer_fingerprint",
]

ROLES = ("reward", "initial-policy", "critic", "function")
"""What a server serves: a reward model's end scores, the initial (reference) policy's
per-token log-probs, a critic's per-token values (and its training steps), or a rule-based
reward function of the decoded text."""

ENDPOINTS = {
    "reward": ("score", "score_text"),
    "initial-policy": ("logprobs",),
    "critic": ("values", "train_step", "save", "load", "export"),
    "function": ("score_text",),
}
"""POST /v1/<endpoint> per role; GET /health answers for every role."""

DTYPES = ("int32", "int64", "float32", "float64", "bool")
"""Array dtypes accepted on the wire (anything else is refused, naming the field)."""


class ProtocolError(ValueError):
    """A malformed request or response: says which field and why (HTTP 400)."""


class ConflictError(RuntimeError):
    """A request that does not fit the server's state (HTTP 409): a critic ``train_step``
    for another step than the server's next one, names both numbers."""


def encode_array(array: Any) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` with ``data`` the base64 of the C-order bytes."""
    a = np.ascontiguousarray(np.asarray(array))
    if a.dtype.name not in DTYPES:
        raise ProtocolError(f"dtype {a.dtype.name} cannot be sent; allowed: {', '.join(DTYPES)}")
    return {"dtype": a.dtype.name, "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(value: Any, *, field: str, max_elements: int | None = None) -> np.ndarray:
    """The inverse of `encode_array`; refuses a wrong dtype, shape or byte count, naming
    ``field``."""
    if not isinstance(value, Mapping) or set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{field}: expected an object with dtype, shape and data")
    dtype, shape = value["dtype"], value["shape"]
    if dtype not in DTYPES:
        raise ProtocolError(f"{field}: dtype {dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ProtocolError(f"{field}: shape {shape!r} is not a list of sizes")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if max_elements is not None and count > max_elements:
        raise ProtocolError(f"{field}: {count} elements exceed the server's limit of "
                            f"{max_elements}")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (ValueError, TypeError) as err:
        raise ProtocolError(f"{field}: data is not base64 ({err})") from None
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ProtocolError(f"{field}: {len(raw)} bytes do not hold {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def encode_arrays(arrays: Mapping[str, Any]) -> dict[str, Any]:
    return {k: encode_array(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def decode_arrays(body: Mapping[str, Any], fields: tuple[str, ...], *,
                  max_elements: int | None = None) -> dict[str, np.ndarray]:
    """The named array fields of ``body`` (each required)."""
    missing = [f for f in fields if f not in body]
    if missing:
        raise ProtocolError(f"missing field(s): {', '.join(missing)}")
    return {f: decode_array(body[f], field=f, max_elements=max_elements) for f in fields}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id) and special tokens: two tokenizers
    with the same fingerprint turn the same text into the same ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    blob = json.dumps({"vocab": vocab, "special": special}, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
