"""Token sampling from logits, driven by caller-supplied uniform random numbers.

Both backends decode with these functions and take their randomness as an
array of uniforms ``u`` in [0, 1), one per (row, step), so that feeding the
same numbers to the torch and the JAX sampler yields the same tokens (parity
level 5). Sampling is by inverse CDF over the filtered distribution:

    token = #{v : cdf_v <= u * cdf_V}      with cdf_v = sum_{w <= v} p_w

Filtering follows the usual order: temperature, then top-k, then top-p
(nucleus, Holtzman et al. 2020: keep the smallest set of most likely tokens
whose probability mass reaches ``top_p``; the most likely token always stays).
Ties at a threshold keep every tied token, identically in both backends.

The log-probability recorded for a sampled token is that of the *unfiltered,
temperature-1* policy, i.e. exactly what the training forward recomputes; the
gap between the two is logged as ``rollout_logprob_gap``.
"""

from __future__ import annotations

import array_api_compat

from shared._array import index_dtype

__all__ = ["filter_logits", "sample_token"]


def _neg_inf_like(xp, x):
    return xp.full_like(x, -float("inf"))


def filter_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Apply temperature, top-k and top-p to ``logits`` [..., V]; removed entries become -inf.

    ``top_k=0`` and ``top_p=1.0`` disable the respective filter. Static
    hyperparameters only, so the function traces under ``jax.jit``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    xp = array_api_compat.array_namespace(logits)
    scaled = logits / temperature if temperature != 1.0 else logits
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = xp.sort(scaled, axis=-1, descending=True)[..., top_k - 1 : top_k]  # [..., 1]
        scaled = xp.where(scaled < kth, _neg_inf_like(xp, scaled), scaled)
    if top_p < 1.0:
        ordered = xp.sort(scaled, axis=-1, descending=True)  # [..., V]
        shifted = ordered - xp.max(ordered, axis=-1, keepdims=True)
        probs = xp.exp(shifted)
        probs = probs / xp.sum(probs, axis=-1, keepdims=True)
        mass_before = xp.cumulative_sum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the first (most likely) token always has mass_before 0
        kept = xp.where(keep, ordered, xp.full_like(ordered, float("inf")))
        threshold = xp.min(kept, axis=-1, keepdims=True)  # smallest kept logit, [..., 1]
        scaled = xp.where(scaled < threshold, _neg_inf_like(xp, scaled), scaled)
    return scaled


def sample_token(logits, uniforms, *, do_sample: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0):
    """Pick one token per row of ``logits`` [B, V] using ``uniforms`` [B] in [0, 1).

    Greedy (``do_sample=False``) takes the argmax and ignores ``uniforms``.
    Returns tokens [B] in the namespace's index dtype (int64 torch/numpy, int32 JAX x32).
    """
    xp = array_api_compat.array_namespace(logits, uniforms)
    if not do_sample:
        return xp.astype(xp.argmax(logits, axis=-1), index_dtype(xp))
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    shifted = filtered - xp.max(filtered, axis=-1, keepdims=True)
    probs = xp.exp(shifted)  # -inf -> 0
    cdf = xp.cumulative_sum(probs, axis=-1)  # [B, V]
    target = xp.astype(uniforms, cdf.dtype)[..., None] * cdf[..., -1:]
    index = xp.sum(xp.astype(cdf <= target, index_dtype(xp)), axis=-1)
    return xp.clip(index, 0, logits.shape[-1] - 1)
