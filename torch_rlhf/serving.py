"""The torch backend's served roles: a `shared.serving.server.RoleHandler` per role, computing
exactly what `torch_rlhf.ppo`'s in-process scoring computes (same model builders, same
position conventions), so a remote role and an in-process one give the same numbers.

Requests (docs/serving.md) are checked by `shared.serving.handlers` (the rollout arrays, the
texts, the role's endpoints); this module keeps only the forwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.logprobs import token_logprobs
from shared.reward_text import load_reward_tokenizer
from shared.serving.handlers import check_endpoint, check_role, rollout_arrays, score_texts
from shared.serving.protocol import tokenizer_fingerprint
from torch_rlhf.models import causal_lm_logits, gather_end_values, text_end_scores
from torch_rlhf.runtime import build_model, resolve_tokenizer

__all__ = ["TorchRoleHandler"]


class TorchRoleHandler:
    """Loads the role's model from ``model_dir`` (a reward model directory for reward and
    critic, a causal LM for the initial policy) with ``config``'s tokenizer and dtype."""

    def __init__(self, role: str, model_dir: str, config: RLHFConfig):
        check_role(role, backend="torch")
        self.role, self.config = role, config
        # a reward model with its own vocabulary scores text with that tokenizer
        self.tokenizer = (load_reward_tokenizer(config)
                          if role == "reward" and config.model.reward_tokenizer_name_or_path
                          else resolve_tokenizer(config, model_dir))
        kind = "causal_lm" if role == "initial-policy" else "value"
        self.model = build_model(kind, config, self.tokenizer, name_or_path=model_dir,
                                 config_dict=None, trainable=False)
        self.identity = {"role": role, "backend": "torch", "model": str(model_dir),
                         "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}

    @staticmethod
    def _rollout(arrays: Mapping[str, np.ndarray]):
        arrays = rollout_arrays(arrays)
        ids = np.concatenate([arrays["prompt_ids"], arrays["response"]], 1)
        mask = np.concatenate([arrays["prompt_mask"], arrays["sample_mask"].astype(np.int64)], 1)
        return (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                arrays["prompt_ids"].shape[1])

    @torch.no_grad()
    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        check_endpoint(self.role, endpoint, backend="torch")
        if endpoint == "score_text":
            return {"scores": self._score_text(score_texts(body))}
        sequences, attention_mask, prompt_length = self._rollout(arrays)
        if endpoint == "score":
            values = self.model(sequences, attention_mask).float()
            scores = gather_end_values(values, attention_mask, prompt_length=prompt_length)
            return {"scores": scores.numpy().astype(np.float32)}
        if endpoint == "values":
            values = self.model(sequences, attention_mask).float()[:, prompt_length - 1:-1]
            return {"values": values.numpy().astype(np.float32)}
        logits = causal_lm_logits(self.model, sequences, attention_mask,  # logprobs
                                  positions=slice(prompt_length - 1, -1)).float()
        tokens = torch.from_numpy(arrays["response"].astype(np.int64))
        return {"logprobs": token_logprobs(logits, tokens).numpy().astype(np.float32)}

    def _score_text(self, texts: list[str]) -> np.ndarray:
        return text_end_scores(self.model, self.tokenizer, texts).numpy().astype(np.float32)
