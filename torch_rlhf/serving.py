"""The torch backend's served roles: a `shared.serving.server.RoleHandler` per role, computing
exactly what `torch_rlhf.ppo`'s in-process scoring computes (same model builders, same
position conventions), so a remote role and an in-process one give the same numbers.

Requests (docs/serving.md): ``prompt_ids``/``prompt_mask`` [B, P] (left-padded) and
``response``/``sample_mask`` [B, N], the layout of `shared.ppo_loop`'s rollouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.logprobs import token_logprobs
from shared.serving.protocol import ProtocolError, tokenizer_fingerprint
from torch_rlhf.models import causal_lm_logits, gather_end_values
from torch_rlhf.runtime import build_model, resolve_tokenizer

__all__ = ["TorchRoleHandler"]

ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "response", "sample_mask")


class TorchRoleHandler:
    """Loads the role's model from ``model_dir`` (a reward model directory for reward and
    critic, a causal LM for the initial policy) with ``config``'s tokenizer and dtype."""

    def __init__(self, role: str, model_dir: str, config: RLHFConfig):
        if role not in ("reward", "initial-policy", "critic"):
            raise ValueError(f"role: {role!r} is invalid; allowed: reward, initial-policy, "
                             "critic")
        self.role, self.config = role, config
        self.tokenizer = resolve_tokenizer(config, model_dir)
        kind = "causal_lm" if role == "initial-policy" else "value"
        self.model = build_model(kind, config, self.tokenizer, name_or_path=model_dir,
                                 config_dict=None, trainable=False)
        self.identity = {"role": role, "backend": "torch", "model": str(model_dir),
                         "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}

    @staticmethod
    def _rollout(arrays: Mapping[str, np.ndarray]):
        missing = [f for f in ROLLOUT_FIELDS if f not in arrays]
        if missing:
            raise ProtocolError(f"missing field(s): {', '.join(missing)}")
        ids = np.concatenate([arrays["prompt_ids"], arrays["response"]], 1)
        mask = np.concatenate([arrays["prompt_mask"], arrays["sample_mask"].astype(np.int64)], 1)
        return (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                arrays["prompt_ids"].shape[1])

    @torch.no_grad()
    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        if endpoint == "score_text":
            return {"scores": self._score_text(body.get("texts"))}
        sequences, attention_mask, prompt_length = self._rollout(arrays)
        if endpoint == "score":
            values = self.model(sequences, attention_mask).float()
            scores = gather_end_values(values, attention_mask, prompt_length=prompt_length)
            return {"scores": scores.numpy().astype(np.float32)}
        if endpoint == "values":
            values = self.model(sequences, attention_mask).float()[:, prompt_length - 1:-1]
            return {"values": values.numpy().astype(np.float32)}
        if endpoint == "logprobs":
            logits = causal_lm_logits(self.model, sequences, attention_mask,
                                      positions=slice(prompt_length - 1, -1)).float()
            tokens = torch.from_numpy(arrays["response"].astype(np.int64))
            return {"logprobs": token_logprobs(logits, tokens).numpy().astype(np.float32)}
        raise ProtocolError(f"{endpoint}: not served by the torch {self.role} handler")

    def _score_text(self, texts: Any) -> np.ndarray:
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise ProtocolError("texts: expected a list of strings")
        encoded = self.tokenizer(texts, padding="longest", return_tensors="pt",
                                 add_special_tokens=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if self.tokenizer.padding_side == "left":
            ids, mask = ids.flip(1), mask.flip(1)  # only the count of real tokens matters
        values = self.model(ids, mask).float()
        return values.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0].numpy()
