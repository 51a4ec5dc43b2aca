"""The served parts of a PPO rollout's scoring (``ppo.initial_policy.url``,
``ppo.reward_model.url``, ``ppo.critic.url``'s values): `shared.ppo_loop` asks the backend
for what it runs in process and this for the rest, with the same arrays, so a served role
changes where a number is computed, not the number (docs/serving.md). A reward model with its
own vocabulary gets the rollout's text instead (``score_text``, `shared.reward_text`), the
text the torch backend re-encodes in process."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.critic_free import models_used
from shared.reward_text import load_reward_tokenizer, reward_texts
from shared.serving.client import RoleClient
from shared.serving.protocol import tokenizer_fingerprint

__all__ = ["ServedScoring"]


class ServedScoring:
    """One client per served role of ``config.ppo``; `fill` adds their answers."""

    def __init__(self, config: Any, tokenizer: Any):
        ppo = config.ppo
        self.tokenizer = tokenizer
        self.clients: dict[str, tuple[RoleClient, str, str]] = {}
        # (key, role, served config, endpoint, answer, the tokenizer the server must have)
        roles = [("ref_logprobs", "initial-policy", ppo.initial_policy, "logprobs", "logprobs",
                  tokenizer)]
        if ppo.reward_model_weight != 0:
            roles.append(("scores", "reward", ppo.reward_model,
                          *self._reward_endpoint(config, tokenizer)))
        if ppo.critic.url is not None and "critic@" in " ".join(models_used(config)):
            # the critic's values at the rollout weights (its training: ServedCritic)
            roles.append(("values", "critic", ppo.critic, "values", "values", tokenizer))
        for key, role, served, endpoint, answer, theirs in roles:
            if served.url is None:
                continue
            client = RoleClient(role, served.url, tokenizer_sha256=tokenizer_fingerprint(theirs),
                                timeout_s=served.timeout_s)
            self.clients[key] = (client, endpoint, answer)

    @staticmethod
    def _reward_endpoint(config: Any, tokenizer: Any) -> tuple[str, str, Any]:
        """``score`` on this run's token ids, or, for a reward model with its own vocabulary
        (``model.reward_tokenizer_name_or_path``), ``score_text`` on the decoded text
        (`shared.reward_text`), from a server whose tokenizer is that one. The same rule as
        the torch backend's in process (`check_reward_tokenizer`): one vocabulary, ids."""
        if not (config.model.reward_tokenizer_name_or_path and config.ppo.reward_model.url):
            return "score", "scores", tokenizer
        reward_tokenizer = load_reward_tokenizer(config)
        if reward_tokenizer.get_vocab() == tokenizer.get_vocab():
            return "score", "scores", reward_tokenizer
        return "score_text", "scores", reward_tokenizer

    def __bool__(self) -> bool:
        return bool(self.clients)

    @property
    def critic_client(self) -> RoleClient | None:
        """The critic server's client (asked for values here; `ServedCritic` trains with it)."""
        return self.clients["values"][0] if "values" in self.clients else None

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
            fields = ({"texts": reward_texts(self.tokenizer, **rollout)}
                      if endpoint == "score_text" else rollout)
            reply = client.call(endpoint, expect={answer: shapes[key]}, **fields)
            out[key] = reply[answer].astype(np.float32)
        return out
