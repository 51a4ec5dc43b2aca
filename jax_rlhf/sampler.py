"""Autoregressive sampling with a static-shape KV cache, the whole decode loop inside XLA.

One jitted call prefills the left-padded prompts `[B, P]` into a cache of `P + N` slots and
runs a `lax.while_loop` of at most N steps (it stops early once every row has finished). Each
step picks the next token with `shared.sample_token` from the caller's uniforms `[B, N]`
(column t drives step t), so the torch backend given the same uniforms picks the same tokens.
A row that has emitted EOS emits `pad_id` with response mask 0 from then on.

The recorded log-prob of a token is `log_softmax` of the raw, temperature-1, unfiltered
logits: what the training forward recomputes (`rollout_logprob_gap` measures the difference).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import shared
from jax_rlhf.models import CausalLM


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static decoding settings (a hashable jit argument)."""

    max_new_tokens: int
    """N: answer length the outputs are padded to."""
    eos_ids: tuple[int, ...]
    """Tokens that end an answer (kept, with mask 1)."""
    pad_id: int
    """Emitted after a row's end."""
    do_sample: bool = True
    """False: greedy (argmax; the uniforms are ignored)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(
        cls, sampling, *, max_new_tokens: int, eos_ids: Sequence[int] | int, pad_id: int,
        greedy: bool = False,
    ) -> SamplingParams:
        """From `ppo.sampling` (a `SamplingConfig`); `greedy` forces argmax decoding."""
        eos = (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)
        return cls(
            max_new_tokens=max_new_tokens,
            eos_ids=tuple(int(e) for e in eos),
            pad_id=int(pad_id),
            do_sample=sampling.do_sample and not greedy,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
        )


class SampleOutput(NamedTuple):
    tokens: jax.Array
    """`[B, N]` int32 answer tokens, `pad_id` after the end."""
    response_mask: jax.Array
    """`[B, N]` int32: 1 up to and including the EOS."""
    logprobs: jax.Array
    """`[B, N]` float32 log pi(y_t | x, y_<t) at temperature 1; 0 where the mask is 0."""


def sample(
    model: CausalLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    uniforms: jax.Array,
    params: SamplingParams,
) -> SampleOutput:
    """Decodes up to `params.max_new_tokens` tokens per row (traceable; see `make_sampler`).

    Args:
      model: the causal LM (e.g. `mdef.merge(...)` inside a jitted function).
      prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
      uniforms: `[B, N]` numbers in [0, 1) (`shared.sampling_uniforms`).
    """
    batch, prompt_len = prompt_ids.shape
    steps = params.max_new_tokens
    if uniforms.shape != (batch, steps):
        raise ValueError(f"uniforms must be [B, N] = {(batch, steps)}, got {uniforms.shape}")
    cache = model.init_cache(batch, prompt_len + steps)
    logits, cache = model(prompt_ids, prompt_mask, cache=cache, logits_to_keep=1)  # [B, 1, V]
    eos = jnp.asarray(params.eos_ids, jnp.int32)

    def cond(carry):
        t, _, _, _, _, _, done = carry
        return (t < steps) & ~jnp.all(done)

    def body(carry):
        t, last, cache, tokens, mask, logprobs, done = carry
        u = jax.lax.dynamic_slice_in_dim(uniforms, t, 1, axis=1)[:, 0]  # [B]
        token = shared.sample_token(
            last, u, do_sample=params.do_sample, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p,
        ).astype(jnp.int32)  # [B]
        logprob = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), token[:, None], -1)
        live = ~done
        token = jnp.where(live, token, params.pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(
            mask, live[:, None].astype(jnp.int32), t, axis=1
        )
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            logprobs, jnp.where(live[:, None], logprob, 0.0), t, axis=1
        )
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
        step_logits, cache = model(token[:, None], live[:, None].astype(jnp.int32), cache=cache)
        return t + 1, step_logits[:, -1].astype(jnp.float32), cache, tokens, mask, logprobs, done

    init = (
        jnp.zeros((), jnp.int32),
        logits[:, -1].astype(jnp.float32),  # left padding: the last slot is the last real token
        cache,
        jnp.full((batch, steps), params.pad_id, jnp.int32),
        jnp.zeros((batch, steps), jnp.int32),
        jnp.zeros((batch, steps), jnp.float32),
        jnp.zeros((batch,), bool),
    )
    _, _, _, tokens, mask, logprobs, _ = jax.lax.while_loop(cond, body, init)
    return SampleOutput(tokens, mask, logprobs)


@functools.partial(jax.jit, static_argnames=("mdef", "params"))
def _sample_jit(mdef, weights, frozen, prompt_ids, prompt_mask, uniforms, params):
    return sample(mdef.merge(weights, frozen), prompt_ids, prompt_mask, uniforms, params)


def generate(mdef, weights, frozen, prompt_ids, prompt_mask, uniforms, params: SamplingParams):
    """Jitted `sample` on the model `mdef.merge(weights, frozen)` (one compile per `mdef`,
    `params` and batch shape)."""
    return _sample_jit(mdef, weights, frozen, prompt_ids, prompt_mask, uniforms, params)
