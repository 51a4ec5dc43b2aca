"""Level 5 (decoding): both samplers on the same weights, prompts and uniforms.

torch: `torch_rlhf.generation.generate` (HF KV cache, a Python loop); JAX: `jax_rlhf.sampler`
(static cache, `lax.while_loop` under jit). Both pick every token with `shared.sample_token` from
the uniforms of `shared.sampling_uniforms`, so greedy and sampled answers must be the same
tokens, and the log-probs each records while decoding must agree to the level-2 tolerance.

A token can legitimately differ when two logits tie within rounding (greedy) or a uniform
falls within rounding of a CDF boundary (sampling); everything after it then differs too. Such
a case fails loudly here (tokens are compared exactly), and the log-probs are compared only on
the prefix where the tokens agree, so one flip does not hide behind a second failure.
"""

from __future__ import annotations

import numpy as np

import shared
from parity_tests.harness import ModelPair, Row, compare, to_numpy

__all__ = ["LevelUnavailable", "decode_both", "jax_sampler_available", "sampler_rows"]


class LevelUnavailable(RuntimeError):
    """A level cannot run because the backend code it compares does not exist (yet)."""


def jax_sampler_available() -> str | None:
    """None when `jax_rlhf.sampler` can be imported, else the reason it cannot."""
    try:
        from jax_rlhf.params import ModelDef  # noqa: F401
        from jax_rlhf.sampler import SamplingParams, generate  # noqa: F401
    except ImportError as err:
        return f"the JAX sampler is not available: {err}"
    return None


def _torch_decode(pair, prompt_ids, prompt_mask, uniforms, **kwargs):
    import torch

    from torch_rlhf.generation import generate

    out = generate(pair.torch, torch.from_numpy(prompt_ids.astype(np.int64)),
                   torch.from_numpy(prompt_mask.astype(np.int64)), uniforms=uniforms, **kwargs)
    return to_numpy(out.response), to_numpy(out.response_mask), to_numpy(out.logprobs)


def _jax_decode(pair, prompt_ids, prompt_mask, uniforms, *, max_new_tokens, eos_token_id,
                pad_token_id, do_sample, temperature, top_k, top_p):
    from jax_rlhf.params import ModelDef
    from jax_rlhf.sampler import SamplingParams, generate

    mdef, params, frozen = ModelDef.split(pair.jax)
    sp = SamplingParams(max_new_tokens=max_new_tokens, eos_ids=(int(eos_token_id),),
                        pad_id=int(pad_token_id), do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p)
    out = generate(mdef, params, frozen, prompt_ids.astype(np.int32),
                   prompt_mask.astype(np.int32), uniforms, sp)
    return to_numpy(out.tokens), to_numpy(out.response_mask), to_numpy(out.logprobs)


def _agreeing_prefix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[B, N] True up to (excluding) the first step where the two token rows differ."""
    return np.cumsum(a != b, axis=-1) == 0


def decode_both(
    lm: ModelPair, prompt_ids: np.ndarray, prompt_mask: np.ndarray, uniforms: np.ndarray,
    **kwargs,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"torch": ..., "jax": ...}, each (tokens [B, N], response_mask [B, N], logprobs [B, N]).

    kwargs: max_new_tokens, eos_token_id, pad_token_id, do_sample, temperature, top_k, top_p.
    """
    return {"torch": _torch_decode(lm, prompt_ids, prompt_mask, uniforms, **kwargs),
            "jax": _jax_decode(lm, prompt_ids, prompt_mask, uniforms, **kwargs)}


def sampler_rows(
    lm: ModelPair,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[Row]:
    """Greedy and sampled decoding of left-padded prompts on both backends.

    Raises:
      LevelUnavailable: when the JAX sampler cannot be imported.
    """
    reason = jax_sampler_available()
    if reason is not None:
        raise LevelUnavailable(reason)
    batch = prompt_ids.shape[0]
    uniforms = shared.sampling_uniforms(seed, 0, 0, shape=(batch, max_new_tokens))
    rows = []
    for mode, do_sample in (("greedy", False), ("sampled", True)):
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                      top_k=top_k, top_p=top_p)
        out = decode_both(lm, prompt_ids, prompt_mask, uniforms, **kwargs)
        (t_tok, t_mask, t_lp), (j_tok, j_mask, j_lp) = out["torch"], out["jax"]
        ended = int((t_mask.sum(-1) < max_new_tokens).sum())
        rows.append(compare("5", f"{mode} tokens", j_tok, t_tok, "exact",
                            note=f"{ended}/{batch} rows ended before step {max_new_tokens}"))
        rows.append(compare("5", f"{mode} response_mask", j_mask, t_mask, "exact"))
        same = _agreeing_prefix(j_tok, t_tok) & (t_mask == 1) & (j_mask == 1)
        rows.append(compare("5", f"{mode} recorded logprobs", j_lp, t_lp, "rollout_logprobs",
                            mask=same))
    return rows


def bf16_rollout_decode(
    lm: ModelPair, prompt_ids: np.ndarray, prompt_mask: np.ndarray, uniforms: np.ndarray,
    **kwargs,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`decode_both` with `ppo.rollout_dtype: bfloat16`: each backend samples on its bf16
    rollout copy of the fp32 model (`torch_rlhf.rollout_weights.RolloutModule`,
    `jax_rlhf.rollout_weights.RolloutWeights`), as the PPO trainers do."""
    import torch

    from jax_rlhf.params import ModelDef
    from jax_rlhf.rollout_weights import RolloutWeights
    from jax_rlhf.sampler import SamplingParams, generate
    from torch_rlhf.generation import generate as torch_generate
    from torch_rlhf.rollout_weights import RolloutModule

    module = RolloutModule("bfloat16").get(lm.torch)
    out = torch_generate(module, torch.from_numpy(prompt_ids.astype(np.int64)),
                         torch.from_numpy(prompt_mask.astype(np.int64)), uniforms=uniforms,
                         **kwargs)
    result = {"torch": (to_numpy(out.response), to_numpy(out.response_mask),
                        to_numpy(out.logprobs.float()))}
    mdef, params, frozen = ModelDef.split(lm.jax)
    state = type("State", (), {"params": params, "frozen": frozen})()
    mdef, params, frozen = RolloutWeights(mdef, "bfloat16").get(state)
    sp = SamplingParams(max_new_tokens=kwargs["max_new_tokens"],
                        eos_ids=(int(kwargs["eos_token_id"]),),
                        pad_id=int(kwargs["pad_token_id"]), do_sample=kwargs["do_sample"],
                        temperature=kwargs["temperature"], top_k=kwargs["top_k"],
                        top_p=kwargs["top_p"])
    out = generate(mdef, params, frozen, prompt_ids.astype(np.int32),
                   prompt_mask.astype(np.int32), uniforms, sp)
    result["jax"] = (to_numpy(out.tokens), to_numpy(out.response_mask), to_numpy(out.logprobs))
    return result
