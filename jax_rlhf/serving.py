"""The JAX backend's served roles: a `shared.serving.server.RoleHandler` per role, computing
what `jax_rlhf.train.engine.score` computes in process (the same forwards, end-score rule and
log-probs), so a client of either backend gets the same numbers from either server. A reward
model with its own vocabulary (``model.reward_tokenizer_name_or_path``) also scores text
(``score_text``): re-encoded by `shared.reward_text` and scored at its last real token, as the
torch backend does in process (the JAX backend has no in-process re-tokenising reward).

Requests (docs/serving.md) are checked by `shared.serving.handlers` (the rollout arrays, the
role's endpoints); this module keeps only the forwards.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import shared
from jax_rlhf.params import ModelDef
from jax_rlhf.train.common import build_model, compute_dtype, load_tokenizer
from jax_rlhf.train.engine import _response_forward
from jax_rlhf.train.reward import end_scores
from shared.reward_text import encode_reward_texts, load_reward_tokenizer
from shared.serving.handlers import check_endpoint, check_role, rollout_arrays, score_texts
from shared.serving.protocol import tokenizer_fingerprint

__all__ = ["JaxRoleHandler"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(endpoint: str, mdef: ModelDef, params, rollout):
    args = (rollout["prompt_ids"], rollout["prompt_mask"], rollout["response"],
            rollout["sample_mask"])
    out, every, seq_mask = _response_forward(mdef.merge(params), *args)
    if endpoint == "logprobs":
        return shared.token_logprobs(out.astype(jnp.float32), rollout["response"])
    if endpoint == "values":
        return out.astype(jnp.float32)
    return end_scores(every.astype(jnp.float32), seq_mask)  # score


@functools.partial(jax.jit, static_argnums=(0,))
def _text_scores(mdef: ModelDef, params, ids, mask):
    """[B] end scores of re-encoded text (`shared.reward_text`): the value at each row's last
    real token, as the torch backend's `text_end_scores`."""
    values, _ = mdef.merge(params)(ids, mask)  # [B, T]
    return end_scores(values.astype(jnp.float32), mask)


class JaxRoleHandler:
    """Loads the role's model from ``model_dir`` (a reward model directory for reward and
    critic, a causal LM for the initial policy) with ``config``'s tokenizer and dtype."""

    def __init__(self, role: str, model_dir: str, config: Any):
        check_role(role, backend="JAX")
        self.role, self.config = role, config
        # a reward model with its own vocabulary scores text with that tokenizer
        self.tokenizer = (load_reward_tokenizer(config)
                          if role == "reward" and config.model.reward_tokenizer_name_or_path
                          else load_tokenizer(config, model_dir))
        kind = "causal_lm" if role == "initial-policy" else "value_head"
        model = build_model(kind, path=model_dir, hf_config=None,
                            seed=config.seed + (0 if kind == "causal_lm" else 1),
                            dtype=compute_dtype(config))
        self.mdef, self.params, _ = ModelDef.split(model)
        self.identity = {"role": role, "backend": "jax", "model": str(model_dir),
                         "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}

    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        check_endpoint(self.role, endpoint, backend="JAX")
        if endpoint == "score_text":
            ids, mask = encode_reward_texts(self.tokenizer, score_texts(body))
            scores = _text_scores(self.mdef, self.params, jnp.asarray(ids, jnp.int32),
                                  jnp.asarray(mask, jnp.int32))
            return {"scores": np.asarray(jax.device_get(scores), np.float32)}
        rollout = {k: jnp.asarray(v.astype(np.int32)) for k, v in rollout_arrays(arrays).items()}
        result = np.asarray(jax.device_get(_forward(endpoint, self.mdef, self.params, rollout)))
        name = {"score": "scores", "values": "values", "logprobs": "logprobs"}[endpoint]
        return {name: result.astype(np.float32)}
