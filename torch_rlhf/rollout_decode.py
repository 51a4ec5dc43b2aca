"""Faster decode loops for the torch rollout path: a static KV cache, packed matmul weights.

:func:`torch_rlhf.generation.generate` runs one of :data:`ROLLOUT_DECODES`
(``engine.torch.rollout_decode``); every one picks each token with
``shared.sampling.sample_token`` from the caller's uniform of that row and step, so the
tokens follow the uniforms exactly as the JAX sampler's do, and records the log-probability
of the raw logits at the chosen token.

- ``module``: the Hugging Face forward with a :class:`~transformers.DynamicCache` that grows
  by one position per step (``generation._decode``); exact eager numerics on CPU.
- ``static``: a preallocated :class:`~transformers.StaticCache` of P + N positions and a
  fixed attention mask [B, P + N] (the not-yet-written positions are hidden by causality):
  every decode step has the same shapes, no cache grows, no mask is concatenated. Attention
  runs over all P + N slots, the unwritten ones masked to exactly 0 weight, so its sums see
  more zero terms and may round differently in the last bit.
- ``packed``: ``static``, and every fp32 ``nn.Linear`` (the LM head included) multiplies
  through oneDNN with its weight reordered once per rollout into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: what
  ``torch.compile`` emits on CPU with ``freezing``, but packed from the weights as they are
  at this rollout, so training steps in between never leave it stale). On the benchmark's
  small model the decode step's matmuls take half the time of ``torch.mm`` at batch 16
  (docs/performance.md). CPU only; the sums are blocked differently, so log-probs differ
  from ``module`` by rounding (~1e-6, inside the rollout tolerance of parity_tests).
- ``compiled``: ``static`` with the one-token forward under ``torch.compile`` (inductor,
  ``mode="default"``, ``dynamic=False``; CUDA graphs need CUDA). Weights stay parameters
  (no freezing), so compiling happens once per batch shape, not per PPO iteration.

Nothing in a decode step reads a tensor back to the host: finished rows are a device-side
mask, every row runs all N steps (static shapes), as in ``module``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from transformers import StaticCache

from shared.sampling import sample_token
from torch_rlhf.models import position_ids_from_mask, takes_logits_to_keep

__all__ = ["ROLLOUT_DECODES", "check_rollout_decode", "decode_static", "packed_linears"]

ROLLOUT_DECODES = ("module", "static", "packed", "compiled")


def check_rollout_decode(rollout_decode: str, *, device_type: str) -> None:
    """ValueError naming the bad value: not one of :data:`ROLLOUT_DECODES`, or ``packed``
    off the CPU (oneDNN's packed linear is a CPU kernel)."""
    if rollout_decode not in ROLLOUT_DECODES:
        raise ValueError(f"rollout_decode: {rollout_decode!r} is invalid; allowed: "
                         f"{', '.join(ROLLOUT_DECODES)}")
    if rollout_decode == "packed" and (device_type != "cpu"
                                       or not torch.backends.mkldnn.is_available()):
        raise ValueError(f"rollout_decode: packed needs oneDNN on CPU; the model is on "
                         f"{device_type} (oneDNN available: "
                         f"{torch.backends.mkldnn.is_available()}); use static or compiled")


def _packed_forward(x: torch.Tensor, *, packed: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    # oneDNN's linear takes 2-D input: [..., in] -> [rows, in] -> [..., out].
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out_features)


@contextlib.contextmanager
def packed_linears(module: nn.Module, *, batch_size: int) -> Iterator[int]:
    """Within the block, every fp32 CPU ``nn.Linear`` of ``module`` computes with a oneDNN
    copy of its current weight (reordered for ``batch_size`` rows); yields how many.

    The copies are made on entry and dropped on exit (the instance ``forward`` is removed,
    so the class's comes back): weights changed by training afterwards are never stale.
    Subclasses of ``nn.Linear`` (LoRA or quantised layers) and other dtypes keep their
    own forward.
    """
    swapped = []
    try:
        for layer in module.modules():
            if (type(layer) is not nn.Linear or layer.weight.dtype != torch.float32
                    or layer.weight.device.type != "cpu" or "forward" in vars(layer)):
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_size)
            bias = None if layer.bias is None else layer.bias.detach()
            layer.forward = functools.partial(_packed_forward, packed=packed, bias=bias,
                                              out_features=layer.out_features)
            swapped.append(layer)
        yield len(swapped)
    finally:
        for layer in swapped:
            del layer.forward


def _static_cache(module: nn.Module, max_cache_len: int) -> StaticCache:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return StaticCache(config=base.config, max_cache_len=max_cache_len)


@functools.cache
def _compiled_step(forward):
    # One compiled graph per bound forward (i.e. per model object); torch.compile's own
    # guards recompile it for a new batch size or cache length.
    return torch.compile(forward, mode="default", dynamic=False)


def decode_static(module: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  uniforms: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | None,
                  pad_token_id: int, do_sample: bool, temperature: float, top_k: int,
                  top_p: float, cache_kwarg: str = "past_key_values",
                  compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, N], logprobs [B, N] decoded with a :class:`StaticCache` of P + N positions.

    The caller (``generation.generate``) has checked the inputs, moved them to the model's
    device, set eval mode and entered ``no_grad``. ``cache_kwarg``: the forward's KV-cache
    keyword (``cache`` from transformers 5.24, ``past_key_values`` before). ``compiled``:
    the one-token forward runs under ``torch.compile`` (the prefill, a different shape run
    once, stays eager).
    """
    batch, prompt_length = prompt_ids.shape
    total = prompt_length + max_new_tokens
    cache = _static_cache(module, total)
    # The whole mask at once: columns P.. are 1 and hidden from step t by the causal
    # mask until the cache holds them; each step then has the same [B, P + N] mask.
    attention_mask = torch.cat(
        [prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)  # [B, P + N]
    positions = position_ids_from_mask(prompt_mask)  # [B, P]
    head = {"logits_to_keep": 1} if takes_logits_to_keep(module) else {}
    out = module(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions,
                 use_cache=True, **{cache_kwarg: cache},
                 cache_position=torch.arange(prompt_length, device=prompt_ids.device), **head)
    logits = out.logits[:, -1].float()  # [B, V]
    step_forward = _compiled_step(module.forward) if compiled else module.forward
    next_position = positions[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    pad = torch.full_like(finished, pad_token_id, dtype=torch.long)
    tokens = prompt_ids.new_empty(batch, max_new_tokens)
    logprobs = torch.empty(batch, max_new_tokens, device=prompt_ids.device)
    for step in range(max_new_tokens):
        token = sample_token(logits, uniforms[:, step], do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p)
        logprobs[:, step] = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
        token = torch.where(finished, pad, token)
        tokens[:, step] = token
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if step + 1 == max_new_tokens:
            break
        cache_position = torch.tensor([prompt_length + step], device=prompt_ids.device)
        out = step_forward(input_ids=token[:, None], attention_mask=attention_mask,
                           position_ids=next_position, use_cache=True,
                           cache_position=cache_position, **{cache_kwarg: cache})
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
    return tokens, logprobs

