"""Rule-based rewards: ``ppo.reward_function: "module:function"``.

The function is called once per rollout row as ``function(prompt, answer)`` on the decoded
prompt text (special tokens and padding removed) and the decoded answer (up to its EOS, as the
held-out metric reads it, ``shared.evaluation.decode_answers``) and returns a number. The
loop mixes it with the reward model's end score (``mix_rewards``: ``reward_model_weight`` and
``reward_function_weight``). Anything that goes wrong names the function and, for a call, the
row with its prompt and answer.

The demo's checker is the first such function: ``shared.data.demo:arithmetic_reward``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from shared.errors import RunError

__all__ = ["RewardFunction", "is_served", "load_reward_function", "mix_rewards"]


def is_served(spec: str | None) -> bool:
    """Whether ``ppo.reward_function`` names a function server (an ``http(s)://`` URL of `rlhf
    serve function`, docs/serving.md) rather than a ``module:function`` to import."""
    return spec is not None and spec.startswith(("http://", "https://"))


class RewardFunction:
    """The loaded ``module:function`` and the per-row scoring around it."""

    def __init__(self, spec: str, function: Callable[[str, str], float]):
        self.spec, self.function = spec, function

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """[B] float32 scores of the rows; a failing call or a value that is not a finite
        number stops the run naming the row, its prompt and answer, and the function."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        out = np.zeros(len(prompts), np.float32)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            where = (f"ppo.reward_function {self.spec} on rollout row {row} (prompt "
                     f"{prompt!r}, answer {answer!r})")
            try:
                value = self.function(prompt, answer)
            except Exception as exc:
                raise RunError(f"{where} raised {type(exc).__name__}: {exc}") from exc
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or \
                    not math.isfinite(float(value)):
                raise RunError(f"{where} returned {value!r}; it must return a finite number")
            out[row] = float(value)
        return out


def load_reward_function(spec: str) -> RewardFunction:
    """Import ``module:function``; a missing module or function, or one that is not callable,
    is an error naming ``spec``. An ``http(s)://`` URL is a function server (`rlhf serve
    function`), called the same way."""
    if is_served(spec):  # `rlhf serve function` (docs/serving.md)
        from shared.serving.function import RemoteRewardFunction

        return RemoteRewardFunction(spec)
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RunError(f"ppo.reward_function: {spec!r} is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RunError(f"ppo.reward_function {spec}: cannot import module {module_name!r} "
                       f"({exc})") from exc
    function = getattr(module, name, None)
    if function is None or not callable(function):
        raise RunError(f"ppo.reward_function {spec}: module {module_name!r} has no callable "
                       f"{name!r}")
    return RewardFunction(spec, function)


def mix_rewards(model_scores: np.ndarray | None, function_scores: np.ndarray | None, *,
                model_weight: float, function_weight: float) -> np.ndarray:
    """``model_weight * model_scores + function_weight * function_scores`` of the parts that
    ran ([B] float32); a part that did not run (None) adds nothing."""
    parts = [w * np.asarray(s, np.float32) for s, w in
             ((model_scores, model_weight), (function_scores, function_weight))
             if s is not None]
    if not parts:
        raise ValueError("no reward: neither a reward model nor a reward function ran")
    return np.asarray(sum(parts), np.float32)
