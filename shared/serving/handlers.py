"""What every backend's model handler checks before its forward, once for both
(`torch_rlhf.serving`, `jax_rlhf.serving`): the roles a model serves, the endpoints each
answers, and the arrays and texts of a request (docs/serving.md). A backend keeps only its
forwards, so the two refuse the same requests with the same words."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.serving.protocol import ProtocolError

__all__ = ["MODEL_ENDPOINTS", "ROLLOUT_FIELDS", "check_endpoint", "check_role",
           "rollout_arrays", "score_texts"]

ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask")
"""A rollout request: ``prompt_ids``/``prompt_mask`` [B, P] (left-padded) and
``response``/``sample_mask`` [B, N], the layout of `shared.ppo_loop`'s rollouts."""

MODEL_ENDPOINTS = {
    "reward": ("score", "score_text"),
    "initial-policy": ("logprobs",),
    "critic": ("values",),
}
"""The roles a backend's model handler serves and the endpoints of each it answers."""


def check_role(role: str, *, backend: str) -> None:
    """A ``ValueError`` naming ``role`` unless a ``backend`` model handler serves it."""
    if role not in MODEL_ENDPOINTS:
        raise ValueError(f"role: {role!r} is invalid for a {backend} model handler; "
                         f"allowed: {', '.join(MODEL_ENDPOINTS)}")


def check_endpoint(role: str, endpoint: str, *, backend: str) -> None:
    """A `ProtocolError` (HTTP 400) unless ``role``'s handler answers ``endpoint``."""
    allowed = MODEL_ENDPOINTS[role]
    if endpoint not in allowed:
        raise ProtocolError(f"{endpoint}: not served by the {backend} {role} handler (it "
                            f"serves {', '.join(allowed)})")


def rollout_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The request's `ROLLOUT_FIELDS` as int64, each required, with one row count and one
    width per pair (prompt, response); a `ProtocolError` names what is wrong."""
    missing = [f for f in ROLLOUT_FIELDS if f not in arrays]
    if missing:
        raise ProtocolError(f"missing field(s): {', '.join(missing)}")
    out = {f: np.asarray(arrays[f]).astype(np.int64) for f in ROLLOUT_FIELDS}
    bad = [f for f, a in out.items() if a.ndim != 2]
    if bad:
        raise ProtocolError(f"{', '.join(bad)}: expected [rows, tokens] arrays")
    for ids, mask in (("prompt_ids", "prompt_mask"), ("response", "sample_mask")):
        if out[ids].shape != out[mask].shape:
            raise ProtocolError(f"{mask}: shape {out[mask].shape} is not {ids}'s "
                                f"{out[ids].shape}")
    if out["prompt_ids"].shape[0] != out["response"].shape[0]:
        raise ProtocolError(f"response: {out['response'].shape[0]} rows for "
                            f"{out['prompt_ids'].shape[0]} prompts")
    return out


def score_texts(body: Mapping[str, Any]) -> list[str]:
    """The ``texts`` of a ``score_text`` request (a non-empty list of strings)."""
    texts = body.get("texts")
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        raise ProtocolError("texts: expected a non-empty list of strings")
    return texts
