"""Held-out evaluation shared by both backends: decode answers, score them, report.

A backend generates answer tokens for the eval prompts (greedy, and sampled
with ``eval.samples_per_prompt`` answers per prompt); this module turns the
token arrays into text the same way for both and computes the configured
metric, so the two backends' ``summary.json`` figures mean the same thing.

``rlhf eval`` prints the same report on both backends: ``model_kind`` tells a reward
model (``*ForSequenceClassification``) from a policy; a reward model gets DeepSpeed-Chat's
``rw_eval`` (``format_reward_eval``: chosen and rejected scores on the pairwise eval data,
pair accuracy, score distribution), a policy, or a baseline and a fine-tuned policy, its
``prompt_eval`` (``format_prompt_eval``: answers side by side with the expected one, and
the held-out metric of each). The text ends with one JSON object of the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from shared.data.demo import arithmetic_accuracy
from shared.rollout import sampling_uniforms

__all__ = [
    "HELDOUT_ITERATION",
    "METRICS",
    "decode_answers",
    "eval_roles",
    "format_prompt_eval",
    "format_reward_eval",
    "heldout_uniforms",
    "model_kind",
    "reward_eval_pairs",
    "reward_eval_summary",
    "score_answers",
]

HELDOUT_ITERATION = 2**32 - 1
"""The ``iteration`` key of ``shared.sampling_uniforms`` for held-out evaluation: no PPO
iteration reaches it, so evaluation randomness never repeats a rollout's."""

# name -> fn(prompts, completions) -> float; "none" is handled by the caller.
METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "arithmetic_accuracy": arithmetic_accuracy,
}


def heldout_uniforms(seed: int, *, rows: int, max_new_tokens: int) -> np.ndarray:
    """The sampling uniforms of held-out evaluation, ``[rows, max_new_tokens]`` float32.

    Rows are prompt-major: row ``i * samples_per_prompt + s`` drives sample s of prompt i.
    Both backends take their rows from this one array (torch: its rank's rows; JAX: rows
    ``start:start + chunk`` per generation chunk), so the figure does not depend on the
    number of ranks, the chunk size or when the evaluation runs. The first r rows do not
    depend on ``rows`` (numbers are drawn row-major), so padding rows may be asked for.
    """
    return sampling_uniforms(seed, HELDOUT_ITERATION, 0, shape=(rows, max_new_tokens))


def decode_answers(tokenizer, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    """Text of each answer: tokens up to (not including) the first EOS, specials removed."""
    response_ids = np.asarray(response_ids)
    response_mask = np.asarray(response_mask).astype(bool)
    eos = tokenizer.eos_token_id
    out = []
    for ids, mask in zip(response_ids, response_mask, strict=True):
        ids = ids[mask]
        if eos is not None:
            ends = np.flatnonzero(ids == eos)
            if ends.size:
                ids = ids[: ends[0]]
        out.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return out


def score_answers(metric: str, prompts: Sequence[str], completions: Sequence[str]) -> float:
    """The value of ``metric`` on (prompt, completion) pairs; errors name the metric."""
    if metric not in METRICS:
        raise ValueError(f"eval.metric: {metric!r} is not one of {sorted(METRICS)}")
    return METRICS[metric](prompts, completions)


def model_kind(path: str | os.PathLike) -> str:
    """``"reward"`` for a Hugging Face directory whose ``config.json`` architectures name a
    ``*ForSequenceClassification`` (our reward models and critics), else ``"policy"``."""
    config = os.path.join(os.fspath(path), "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return "policy"
    reward = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    return "reward" if reward else "policy"


def eval_roles(config, args) -> dict[str, str]:
    """The models `rlhf eval` reports on: ``{"model": dir}`` (``--model``, else the config's
    actor; a reward model gets DeepSpeed-Chat's rw_eval, a policy its prompt_eval), or
    ``{"baseline": dir, "finetune": dir}`` (``--model-baseline`` with ``--model-finetune``,
    prompt_eval side by side); `InputError` naming the flag otherwise."""
    from shared.errors import InputError

    baseline = getattr(args, "model_baseline", None)
    finetune = getattr(args, "model_finetune", None)
    if (baseline is None) != (finetune is None):
        raise InputError("--model-baseline and --model-finetune go together (DeepSpeed-Chat's "
                         "prompt_eval compares the two)")
    if baseline is None:
        path = getattr(args, "model", None) or config.model.actor_model_name_or_path
        if path is None:
            raise InputError("pass --model DIR (a Hugging Face model directory, e.g. "
                             "<run>/ppo/final): the config builds its actor from scratch")
        return {"model": str(path)}
    for flag, path in (("--model-baseline", baseline), ("--model-finetune", finetune)):
        if model_kind(path) == "reward":
            raise InputError(f"{flag}: {path} is a reward model; give it alone as --model "
                             "for its rw_eval report")
    return {"baseline": str(baseline), "finetune": str(finetune)}


def reward_eval_pairs(data_config, tokenizer, *, max_pairs: int):
    """``(PairwiseBatch, chosen texts)``: the first ``max_pairs`` comparisons of the reward
    step's eval split (``data.eval_fraction`` or an eval-only dataset), for ``rw_eval``."""
    from shared.data import PairwiseBatch, build_step_data
    from shared.errors import InputError

    batch = build_step_data(data_config, tokenizer, "reward").eval
    if batch is None:
        raise InputError("rlhf eval of a reward model needs the reward step's eval split: set "
                         "data.eval_fraction > 0 or give an eval-only pairwise dataset")
    if not isinstance(batch, PairwiseBatch):
        raise InputError("rlhf eval of a reward model reads comparisons (pairs); the reward "
                         "eval data holds rankings of more than two responses")
    batch = batch.take(slice(0, max_pairs))
    texts = [tokenizer.decode(ids[mask.astype(bool)].tolist(), skip_special_tokens=True)
             for ids, mask in zip(batch.chosen_input_ids, batch.chosen_attention_mask,
                                  strict=True)]
    return batch, texts


def _distribution(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "min": float(np.min(x)),
            "max": float(np.max(x))}


def reward_eval_summary(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, object]:
    """DeepSpeed-Chat ``rw_eval`` figures of end scores ``chosen`` and ``rejected`` ``[N]``:
    pair accuracy (chosen > rejected, as its step-2 evaluation counts it) and the
    mean/std/min/max of the chosen and rejected scores and of their margin."""
    chosen = np.asarray(chosen, np.float64)
    rejected = np.asarray(rejected, np.float64)
    if chosen.ndim != 1 or chosen.shape != rejected.shape or not len(chosen):
        raise ValueError(f"chosen and rejected must be equal non-empty [N] arrays, got "
                         f"{chosen.shape} and {rejected.shape}")
    return {"pairs": len(chosen), "pair_accuracy": float(np.mean(chosen > rejected)),
            "chosen": _distribution(chosen), "rejected": _distribution(rejected),
            "margin": _distribution(chosen - rejected)}


def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_reward_eval(model: str, texts: Sequence[str], chosen: np.ndarray,
                       rejected: np.ndarray, *, show: int = 8) -> str:
    """The ``rw_eval`` report: the first ``show`` pairs (chosen text, both scores), the
    distribution table, then one JSON line ``{"model", "kind": "reward", ...figures}``."""
    summary = reward_eval_summary(chosen, rejected)
    lines = [f"reward model {model}: {summary['pairs']} pairs of the eval data",
             f"{'chosen':>10} {'rejected':>10}  chosen text"]
    for text, c, r in list(zip(texts, chosen, rejected, strict=True))[:show]:
        lines.append(f"{float(c):10.4f} {float(r):10.4f}  {_one_line(text)}")
    lines.append(f"pair accuracy (chosen > rejected): {summary['pair_accuracy']:.4f}")
    lines.append(f"{'score':>10} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}")
    for name in ("chosen", "rejected", "margin"):
        d = summary[name]
        lines.append(f"{name:>10} {d['mean']:10.4f} {d['std']:10.4f} {d['min']:10.4f} "
                     f"{d['max']:10.4f}")
    lines.append(json.dumps({"model": model, "kind": "reward", **summary}))
    return "\n".join(lines) + "\n"


def format_prompt_eval(models: Mapping[str, str], prompts: Sequence[str],
                       expected: Sequence[str] | None, answers: Mapping[str, Sequence[str]],
                       heldout: Mapping[str, Mapping[str, float]]) -> str:
    """The ``prompt_eval`` report: per prompt, the expected answer (where the data has one)
    and each model's greedy answer, side by side; then one JSON line. ``models`` maps a
    role (``model``, or ``baseline`` and ``finetune``) to its path, ``answers`` and
    ``heldout`` (its held-out metric, {} for none) are keyed by role. With one model the
    JSON is ``{"model", "kind": "policy", "heldout"}``; with several, ``heldout`` maps each
    role to its figures and each role names its path."""
    roles = list(models)
    width = max(len(r) for r in [*roles, "expected"])
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"==== prompt {i}: {_one_line(prompt, 200)}")
        if expected is not None and str(expected[i]):
            lines.append(f"  {'expected':<{width}} | {_one_line(expected[i], 200)}")
        for role in roles:
            lines.append(f"  {role:<{width}} | {_one_line(answers[role][i], 200)}")
    for role in roles:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in heldout[role].items()) or "no eval.metric"
        lines.append(f"held-out ({role}): {figures}")
    if roles == ["model"]:
        result = {"model": models["model"], "kind": "policy", "heldout": dict(heldout["model"])}
    else:
        result = {**dict(models), "kind": "policy",
                  "heldout": {r: dict(heldout[r]) for r in roles}}
    lines.append(json.dumps(result))
    return "\n".join(lines) + "\n"
