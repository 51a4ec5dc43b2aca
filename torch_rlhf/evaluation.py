"""Held-out evaluation of a policy: answers to held-out prompts, scored by ``eval.metric``.

Greedy answers and ``eval.samples_per_prompt`` sampled answers per prompt (sampling
parameters from ``ppo.sampling``) are decoded and scored by ``shared.evaluation``, the same
code the JAX backend uses. Sampling is driven by
``shared.evaluation.heldout_uniforms(seed, rows=rows, max_new_tokens=N)`` (the same array
the JAX backend slices) with rows prompt-major (row ``i * samples + s`` is sample s of
prompt i), so the figure does not depend on the number of ranks or on when the evaluation
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shared.config import RLHFConfig
from shared.data import DataReport, DatasetSpec, PromptBatch, build_step_data, read_dataset
from shared.data.tokenize import encode_prompts, end_of_conversation_ids
from shared.evaluation import HELDOUT_ITERATION, decode_answers, heldout_uniforms, score_answers
from torch_rlhf.distributed import all_gather_rows, rank_rows, world_size
from torch_rlhf.generation import generate

__all__ = [
    "EVAL_SAMPLING_ITERATION",
    "eos_token_id",
    "generate_answers",
    "heldout_metrics",
    "load_eval_prompts",
]

logger = logging.getLogger(__name__)

# The `iteration` key of the held-out sampling uniforms (shared.evaluation).
EVAL_SAMPLING_ITERATION = HELDOUT_ITERATION
_ROWS_PER_CALL = 256  # generation chunk per rank


def eos_token_id(config: RLHFConfig, tokenizer) -> int:
    """The id that ends an answer: the end-of-conversation token's (last) id, as DS-Chat."""
    return end_of_conversation_ids(tokenizer, config.data.end_of_conversation_token)[-1]


def load_eval_prompts(config: RLHFConfig, tokenizer) -> PromptBatch | None:
    """The held-out prompts (with reference answers): ``eval.dataset``, else the eval split
    of the PPO prompt data; at most ``eval.max_prompts``. None when ``eval.metric`` is none."""
    if config.eval.metric == "none":
        return None
    if config.eval.dataset is not None:
        records, _ = read_dataset(DatasetSpec(config.eval.dataset, format="prompt"),
                                  config.data)
        prompts = [r.prompt for r in records]
        ids, mask = encode_prompts(tokenizer, prompts,
                                   max_prompt_seq_len=config.data.max_prompt_seq_len,
                                   report=DataReport(), scope="eval")
        batch = PromptBatch(ids, mask, np.asarray(prompts),
                            np.asarray([r.reference or "" for r in records]))
    else:
        batch = build_step_data(config.data, tokenizer, "ppo").eval
        if batch is None:
            raise ValueError("eval.metric is set but there are no held-out prompts: set "
                             "eval.dataset or give the PPO data an eval split")
    return batch.take(slice(0, config.eval.max_prompts))


def generate_answers(model, prompts: PromptBatch, config: RLHFConfig, tokenizer, *,
                     sample: bool, samples_per_prompt: int = 1) -> list[str]:
    """Decoded answers, prompt-major: ``samples_per_prompt`` per prompt.

    Every rank must call this (rows are split over ranks and gathered back).
    """
    ids = np.repeat(prompts.prompt_input_ids, samples_per_prompt, axis=0)
    mask = np.repeat(prompts.prompt_attention_mask, samples_per_prompt, axis=0)
    rows, answer_len = ids.shape[0], config.data.max_answer_seq_len
    padded = -(-rows // world_size()) * world_size()
    order = np.minimum(np.arange(padded), rows - 1)  # repeat the last row as filler
    uniforms = heldout_uniforms(config.seed, rows=padded, max_new_tokens=answer_len)
    local = order[rank_rows(padded)]
    sampling = config.ppo.sampling
    do_sample = sample and sampling.do_sample
    eos = eos_token_id(config, tokenizer)
    responses, masks = [], []
    for start in range(0, len(local), _ROWS_PER_CALL):
        part = local[start:start + _ROWS_PER_CALL]
        out = generate(model, torch.from_numpy(ids[part]).long(),
                       torch.from_numpy(mask[part]).long(), max_new_tokens=answer_len,
                       eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                       uniforms=uniforms[rank_rows(padded)][start:start + _ROWS_PER_CALL],
                       do_sample=do_sample, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p)
        responses.append(out.response.cpu())
        masks.append(out.response_mask.cpu())
    response = all_gather_rows(torch.cat(responses))[:rows]
    response_mask = all_gather_rows(torch.cat(masks))[:rows]
    return decode_answers(tokenizer, response.numpy(), response_mask.numpy())


def heldout_metrics(model, tokenizer, config: RLHFConfig,
                    prompts: PromptBatch | None = None) -> dict[str, Any]:
    """``{metric: sampled score, metric + "_greedy": greedy score}``; {} for metric none.

    Every rank must call this.
    """
    metric = config.eval.metric
    if metric == "none":
        return {}
    prompts = prompts if prompts is not None else load_eval_prompts(config, tokenizer)
    texts = [str(t) for t in prompts.prompt_text]
    samples = config.eval.samples_per_prompt
    sampled = generate_answers(model, prompts, config, tokenizer, sample=True,
                               samples_per_prompt=samples)
    out = {metric: score_answers(metric, np.repeat(texts, samples).tolist(), sampled)}
    if config.eval.greedy:
        greedy = generate_answers(model, prompts, config, tokenizer, sample=False)
        out[f"{metric}_greedy"] = score_answers(metric, texts, greedy)
    logger.info("held-out %s", _format(out))
    return out


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
