"""A rule-based reward function served over HTTP (`rlhf serve function --function
module:function`), for verifiers too slow or too isolated to run in the trainer, and the
trainer's side of it: ``ppo.reward_function: http://host:port`` calls such a server with the
decoded prompts and answers exactly as a local ``module:function`` would be called."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.reward_fn import load_reward_function
from shared.serving.client import RoleClient
from shared.serving.protocol import ProtocolError

__all__ = ["FunctionHandler", "RemoteRewardFunction"]


def _texts(body: Mapping[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
        raise ProtocolError(f"{name}: expected a list of strings")
    return value


class FunctionHandler:
    """Serves ``module:function`` on POST /v1/score_text ``{"prompts": [...], "answers":
    [...]}`` -> ``{"scores": float32 [B]}``; a failing row is a 500 naming it."""

    def __init__(self, spec: str):
        self.function = load_reward_function(spec)
        self.identity = {"role": "function", "backend": "python", "model": spec,
                         "tokenizer_sha256": None}

    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        if endpoint != "score_text":
            raise ProtocolError(f"{endpoint}: a function server answers score_text only")
        prompts, answers = _texts(body, "prompts"), _texts(body, "answers")
        if len(prompts) != len(answers):
            raise ProtocolError(f"{len(prompts)} prompts but {len(answers)} answers")
        return {"scores": self.function(prompts, answers)}


class RemoteRewardFunction:
    """`shared.reward_fn.RewardFunction`'s interface over a function server."""

    def __init__(self, url: str, *, timeout_s: float = 120.0):
        self.spec = url
        self.client = RoleClient("function", url, timeout_s=timeout_s)

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        out = self.client.call("score_text", prompts=list(prompts), answers=list(answers),
                               expect={"scores": (len(prompts),)})
        return out["scores"].astype(np.float32)
