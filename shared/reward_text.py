"""The text a reward model with its own vocabulary scores (``model.reward_tokenizer_name_or_path``
with ``model.retokenize_for_reward``), built here once for every path that scores it: the torch
backend's in-process reward model, a served one (`rlhf serve reward`, the ``score_text``
endpoint of either backend) and the loop's client of that server (`shared.serving.roles`).

The actor's tokens become text as ``ppo.reward_function`` reads them: the prompt decoded with
special tokens and padding removed, the answer up to its first EOS
(``shared.evaluation.decode_answers``). The reward model reads ``prompt + answer`` followed by
its own tokenizer's EOS text, encoded by that tokenizer with its special tokens (its template,
a BOS for example), and scores the last real token, as it was trained on chosen and rejected
answers that end with EOS (DeepSpeed-Chat's reward data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.evaluation import decode_answers

__all__ = ["encode_reward_texts", "load_reward_tokenizer", "reward_texts", "rollout_texts"]


def rollout_texts(tokenizer: Any, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                  response: np.ndarray, sample_mask: np.ndarray) -> tuple[list[str], list[str]]:
    """The decoded prompts and answers of a rollout (``prompt_ids``/``prompt_mask`` [B, P],
    left-padded; ``response``/``sample_mask`` [B, N]) with the actor's ``tokenizer``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = tokenizer.batch_decode(np.where(np.asarray(prompt_mask) > 0, prompt_ids, pad),
                                     skip_special_tokens=True)
    return prompts, decode_answers(tokenizer, response, sample_mask)


def reward_texts(tokenizer: Any, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
                 response: np.ndarray, sample_mask: np.ndarray) -> list[str]:
    """``prompt + answer`` per row (`rollout_texts`): what a ``score_text`` request sends."""
    prompts, answers = rollout_texts(tokenizer, prompt_ids, prompt_mask, response, sample_mask)
    return [p + a for p, a in zip(prompts, answers, strict=True)]


def encode_reward_texts(reward_tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """``texts`` + the reward tokenizer's EOS, encoded with its special tokens: ids and mask
    [B, T] int64, right-padded with its pad id (so row ``b``'s end is ``mask[b].sum() - 1``
    whatever side the tokenizer pads on)."""
    eos = reward_tokenizer.eos_token or ""
    rows = reward_tokenizer([t + eos for t in texts], add_special_tokens=True)["input_ids"]
    width = max(1, *(len(r) for r in rows)) if rows else 1
    pad = reward_tokenizer.pad_token_id if reward_tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return ids, mask


def load_reward_tokenizer(config: Any) -> Any:
    """``model.reward_tokenizer_name_or_path``'s tokenizer, with the run's pad rule
    (``shared.data.prepare_tokenizer``): the one a text-scoring reward server must have (its
    fingerprint, ``shared.serving.protocol.tokenizer_fingerprint``)."""
    import transformers

    from shared.data import prepare_tokenizer
    from shared.errors import check_model_source, loading

    path = config.model.reward_tokenizer_name_or_path
    check_model_source(path, what="tokenizer")
    with loading("tokenizer", path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.model.trust_remote_code)
    return prepare_tokenizer(tokenizer, pad_with_eos=config.data.pad_with_eos)
