"""The served parts of a PPO rollout's scoring (``ppo.initial_policy.url``,
``ppo.reward_model.url``, ``ppo.critic.url``'s values): `shared.ppo_loop` asks the backend
for what it runs in process and this for the rest, with the same arrays, so a served role
changes where a number is computed, not the number (docs/serving.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.critic_free import models_used
from shared.errors import InputError
from shared.serving.client import RoleClient
from shared.serving.protocol import tokenizer_fingerprint

__all__ = ["ServedScoring"]


class ServedScoring:
    """One client per served role of ``config.ppo``; `fill` adds their answers."""

    def __init__(self, config: Any, tokenizer: Any):
        ppo = config.ppo
        self.clients: dict[str, tuple[RoleClient, str, str]] = {}
        roles = [("ref_logprobs", "initial-policy", ppo.initial_policy, "logprobs", "logprobs")]
        if ppo.reward_model_weight != 0:
            if ppo.reward_model.url and config.model.reward_tokenizer_name_or_path:
                raise InputError(
                    "ppo.reward_model.url with model.reward_tokenizer_name_or_path: a served "
                    "reward model scores this run's token ids, so it must share the actor's "
                    "tokenizer (re-tokenising on the server is not supported yet)")
            roles.append(("scores", "reward", ppo.reward_model, "score", "scores"))
        if ppo.critic.url is not None and "critic@" in " ".join(models_used(config)):
            # the critic's values at the rollout weights (its training: ServedCritic)
            roles.append(("values", "critic", ppo.critic, "values", "values"))
        fingerprint = None
        for key, role, served, endpoint, answer in roles:
            if served.url is None:
                continue
            fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
            client = RoleClient(role, served.url, tokenizer_sha256=fingerprint,
                                timeout_s=served.timeout_s)
            self.clients[key] = (client, endpoint, answer)

    def __bool__(self) -> bool:
        return bool(self.clients)

    def wait_until_ready(self) -> dict[str, dict]:
        """Each server's identity, once it answers (a clear error naming it otherwise)."""
        return {key: client.wait_until_ready()["identity"]
                for key, (client, _, _) in self.clients.items()}

    def fill(self, scored: dict[str, np.ndarray], prompt_ids: np.ndarray,
             prompt_mask: np.ndarray, response: np.ndarray,
             sample_mask: np.ndarray) -> dict[str, np.ndarray]:
        """``scored`` with ``ref_logprobs`` [B, N], ``scores`` [B] and ``values`` [B, N] from
        the servers."""
        out = dict(scored)
        rollout = {"prompt_ids": np.asarray(prompt_ids, np.int64),
                   "prompt_mask": np.asarray(prompt_mask, np.int64),
                   "response": np.asarray(response, np.int64),
                   "sample_mask": np.asarray(sample_mask, np.int64)}
        shapes = {"ref_logprobs": response.shape, "scores": response.shape[:1],
                  "values": response.shape}
        for key, (client, endpoint, answer) in self.clients.items():
            reply = client.call(endpoint, expect={answer: shapes[key]}, **rollout)
            out[key] = reply[answer].astype(np.float32)
        return out
