"""Rollout generation: the parity sampler, and the choice between it and the Hybrid Engine.

:func:`generate` decodes token by token with the Hugging Face model's KV cache and picks
each token with ``shared.sampling.sample_token`` driven by caller-supplied uniforms, so
the JAX backend, fed the same uniforms, picks the same tokens. It records the
log-probability of each sampled token under the raw (temperature-1, unfiltered) logits:
what the training forward recomputes, so the two differ only by numerics.

DeepSpeed's Hybrid Engine (DS-Chat ``--enable_hybrid_engine``) swaps in CUDA inference
kernels for ``generate``. :func:`select_rollout_path` decides whether to use it, and
:func:`generate_rollout` runs the decision, falling back to :func:`generate` under
``auto``. DeepSpeed refuses on CPU, and how depends on the model and the transformers
version (DeepSpeed 0.19.8, measured):

- ``deepspeed.initialize`` with the Hybrid Engine enabled raises ``ValueError: This op had
  not been implemented on CPU backend.`` while building the inference containers (their
  attention op has no CPU build): Llama and GPT-2, and OPT from transformers 5.24.
- OPT up to transformers 5.23: DeepSpeed finds no inference policy for transformers'
  Cache-based decoder layer, so the engine initialises with no inference containers, never
  sets ``_generate``, and ``engine.generate`` raises ``AttributeError: ... no attribute
  '_generate'``. (This is device-independent; DS-Chat calls ``engine.module.generate``,
  which then silently is plain Hugging Face ``generate``.)

Any exception DeepSpeed raises building the Hybrid Engine (:func:`~torch_rlhf.deepspeed_config.
initialize_engine`) or generating with it (:func:`try_hybrid_engine_generate`) becomes a
:class:`~torch_rlhf.deepspeed_config.HybridEngineUnavailable` that names it: ``auto`` falls
back to the module path and logs why, ``on`` raises it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from shared.console import say_once
from shared.sampling import sample_token
from torch_rlhf.deepspeed_config import HybridEngineUnavailable
from torch_rlhf.models import position_ids_from_mask, takes_logits_to_keep, unwrap_model
from torch_rlhf.rollout_decode import check_rollout_decode, decode_static, packed_linears
from torch_rlhf.saving import gather_params_for_forward

__all__ = [
    "GenerationOutput",
    "generate",
    "generate_rollout",
    "generation_output_from_hf",
    "select_rollout_path",
    "try_hybrid_engine_generate",
]

logger = logging.getLogger(__name__)

_HYBRID_ENGINE_MODES = ("auto", "on", "off")
_CPU_FAILURE = (
    "DeepSpeed's inference ops have no CPU build: building the inference containers raises "
    "'ValueError: This op had not been implemented on CPU backend.', or, with no inference "
    "policy for the model (OPT up to transformers 5.23), it builds none and engine.generate "
    "raises AttributeError: ... no attribute '_generate'"
)
# Hints for the refusals measured on CPU (module docstring), keyed by a fragment of the
# exception's text; any other exception is reported as it is.
_REFUSAL_HINTS = {
    "not been implemented on CPU": "DeepSpeed's inference ops have no CPU build",
    "no attribute '_generate'": "the engine built no inference containers: no DeepSpeed "
                                "inference policy matches the model's decoder layers",
}


def _refusal(err: BaseException) -> str:
    """``Type: message`` of a Hybrid Engine refusal, with a hint where it is a known one."""
    text = f"{type(err).__name__}: {err}"
    hints = [hint for fragment, hint in _REFUSAL_HINTS.items() if fragment in str(err)]
    return f"{text} ({hints[0]})" if hints else text


@dataclass(frozen=True)
class GenerationOutput:
    """One batch of rollouts; static shapes B x (P + N).

    Attributes:
      sequences: [B, P + N] prompt (as given, left-padded) then response.
      response: [B, N] generated tokens; ``pad_token_id`` after a row's EOS.
      response_mask: [B, N] 1 up to and including the EOS, 0 after.
      logprobs: [B, N] float32 log-softmax of the raw logits at the chosen token; 0 where
        ``response_mask`` is 0.
      attention_mask: [B, P + N] the prompt mask then ``response_mask``.
    """

    sequences: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    attention_mask: torch.Tensor


def _check_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   max_new_tokens: int) -> None:
    if prompt_ids.ndim != 2 or tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _finish(prompt_ids, prompt_mask, tokens, logprobs, *, eos_token_id, pad_token_id):
    # tokens, logprobs: [B, N] as decoded. Everything after a row's first EOS is
    # padding, whatever the decoder emitted there.
    if eos_token_id is None:
        alive = torch.ones_like(tokens, dtype=torch.bool)
    else:
        is_eos = (tokens == eos_token_id).long()
        alive = (is_eos.cumsum(-1) - is_eos) == 0  # no EOS strictly before t
    response = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
    response_mask = alive.long()
    logprobs = torch.where(alive, logprobs, torch.zeros_like(logprobs))
    return GenerationOutput(
        sequences=torch.cat([prompt_ids, response], dim=1),
        response=response,
        response_mask=response_mask,
        logprobs=logprobs,
        attention_mask=torch.cat([prompt_mask.long(), response_mask], dim=1),
    )


def _chosen_logprob(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]


def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    uniforms: np.ndarray | torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    gather_zero3_params: bool = True,
    rollout_decode: str = "module",
) -> GenerationOutput:
    """Decode ``max_new_tokens`` tokens for every prompt with the parity sampler.

    Always runs N = ``max_new_tokens`` steps (static shapes; finished rows keep emitting
    pad). Positions are cumsum(attention_mask) - 1 as in Hugging Face ``generate`` for
    left padding; the attention mask grows by one 1 per step. Runs under ``no_grad`` with
    the model in eval mode (its mode is restored after).

    Under ZeRO-3 (``gather_zero3_params``) the full parameters are gathered once for the
    whole decode (``torch_rlhf.saving.gather_params_for_forward``: ZeRO-3's fetch / release
    hooks are lifted meanwhile, so ``model`` must be the engine, not its module): the entire
    model is materialised on every rank for its duration (as the Hybrid Engine does),
    instead of one all-gather per layer per token. With False, ZeRO-3's hooks fetch each
    layer as it runs: less memory, N x layers all-gathers.

    Args:
      model: a causal LM or a DeepSpeed engine around one.
      prompt_ids: [B, P] left-padded prompts.
      prompt_mask: [B, P] 1 on prompt tokens.
      max_new_tokens: N.
      eos_token_id: ends a row (included in its response); None: rows never end.
      pad_token_id: emitted after a row's EOS.
      uniforms: [B, N] numbers in [0, 1) (numpy or torch), one per row and step; required
        when ``do_sample``.
      do_sample: inverse-CDF sampling (else greedy argmax).
      temperature, top_k, top_p: filters of ``shared.sampling.filter_logits``.
      rollout_decode: the decode loop (``torch_rlhf.rollout_decode``): ``module`` (a
        growing DynamicCache), ``static`` (a preallocated StaticCache), ``packed`` (static,
        oneDNN-packed linear weights; CPU) or ``compiled`` (static, torch.compile).

    Returns:
      GenerationOutput with logprobs of the raw logits (not the filtered ones).
    """
    module = unwrap_model(model)
    _check_prompts(prompt_ids, prompt_mask, max_new_tokens)
    device = next(module.parameters()).device
    check_rollout_decode(rollout_decode, device_type=device.type)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()
    batch = prompt_ids.shape[0]
    if do_sample:
        if uniforms is None:
            raise ValueError("do_sample=True needs uniforms [B, max_new_tokens]")
        uniforms = torch.as_tensor(uniforms).to(device)
        if tuple(uniforms.shape) != (batch, max_new_tokens):
            raise ValueError(f"uniforms must be [B, N] = {(batch, max_new_tokens)}, "
                             f"got {tuple(uniforms.shape)}")
    else:
        uniforms = torch.zeros(batch, max_new_tokens, device=device)  # ignored by argmax
    gather = gather_params_for_forward(model) if gather_zero3_params else contextlib.nullcontext()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), gather:
            sampling = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p)
            if rollout_decode == "module":
                tokens, logprobs = _decode(module, prompt_ids, prompt_mask, uniforms,
                                           **sampling)
            else:
                packing = (packed_linears(module, batch_size=batch)
                           if rollout_decode == "packed" else contextlib.nullcontext())
                with packing:
                    tokens, logprobs = decode_static(
                        module, prompt_ids, prompt_mask, uniforms,
                        cache_kwarg=_forward_cache_kwarg(type(_base_model(module))),
                        compiled=rollout_decode == "compiled", **sampling)
    finally:
        module.train(was_training)
    return _finish(prompt_ids, prompt_mask, tokens, logprobs, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id)


def _last_logits_only(module: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: the prefill then computes the LM head
    on the last prompt position only, as Hugging Face ``generate`` does, not on all P."""
    return {"logits_to_keep": 1} if takes_logits_to_keep(module) else {}


def _kv_cache(module: nn.Module) -> dict[str, DynamicCache]:
    """The forward's KV-cache keyword and a new, empty :class:`DynamicCache`: the cache the
    model's own forward would create for ``use_cache=True`` and update in place.

    The keyword is ``cache`` from transformers 5.24 (which deprecates ``past_key_values``,
    to be removed in 5.40), ``past_key_values`` before."""
    base = _base_model(module)
    try:
        cache = DynamicCache(config=base.config)
    except TypeError:  # transformers < 4.56: layers are created as they are filled
        cache = DynamicCache()
    return {_forward_cache_kwarg(type(base)): cache}


def _base_model(module: nn.Module) -> nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


@functools.cache
def _forward_cache_kwarg(cls: type) -> str:
    # Per class, as _forward_takes_logits_to_keep: inspect.signature costs a rollout step.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else (
        "past_key_values")


def _decode(module, prompt_ids, prompt_mask, uniforms, *, max_new_tokens, eos_token_id,
            pad_token_id, do_sample, temperature, top_k, top_p):
    batch = prompt_ids.shape[0]
    attention_mask = prompt_mask
    positions = position_ids_from_mask(prompt_mask)  # [B, P]
    cache = _kv_cache(module)  # one Cache object for the whole decode
    out = module(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=positions,
                 use_cache=True, **cache, **_last_logits_only(module))
    next_position = positions[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    pad = torch.full_like(finished, pad_token_id, dtype=torch.long)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [B, V]
        token = sample_token(logits, uniforms[:, step], do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p)
        logprobs.append(_chosen_logprob(logits, token))
        token = torch.where(finished, pad, token)
        tokens.append(token)
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if step + 1 == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        out = module(input_ids=token[:, None], attention_mask=attention_mask,
                     position_ids=next_position, use_cache=True, **cache)
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)  # [B, N] each


def generation_output_from_hf(sequences: torch.Tensor, step_logits: Sequence[torch.Tensor],
                              prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                              max_new_tokens: int, eos_token_id: int | None,
                              pad_token_id: int) -> GenerationOutput:
    """A :class:`GenerationOutput` from Hugging Face ``generate`` results.

    ``generate(..., return_dict_in_generate=True, output_logits=True)`` gives
    ``sequences`` [B, P + n] (n <= N: it stops once every row has ended) and one raw
    logits tensor [B, V] per step; the response is padded to N and masked after EOS.
    """
    prompt_length = prompt_ids.shape[1]
    response = sequences[:, prompt_length:]  # [B, n]
    steps = response.shape[1]
    logits = torch.stack(tuple(step_logits), 1).float()  # [B, n, V]
    logprobs = torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]
    missing = max_new_tokens - steps
    if missing > 0:  # every row ended before step N
        response = torch.cat([response, response.new_full((response.shape[0], missing),
                                                          pad_token_id)], 1)
        logprobs = torch.cat([logprobs, logprobs.new_zeros(logprobs.shape[0], missing)], 1)
    return _finish(prompt_ids, prompt_mask, response, logprobs, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id)


def select_rollout_path(hybrid_engine: str, *, device_type: str,
                        model_type: str) -> tuple[str, str]:
    """Which generator produces rollouts: ("hybrid_engine" | "module", reason).

    ``auto`` picks the Hybrid Engine on CUDA only; ``on`` demands it and raises
    RuntimeError where it cannot run (any non-CUDA device); ``off`` never uses it.
    """
    if hybrid_engine not in _HYBRID_ENGINE_MODES:
        raise ValueError(f"hybrid_engine: {hybrid_engine!r} is invalid; allowed: "
                         f"{', '.join(_HYBRID_ENGINE_MODES)}")
    if hybrid_engine == "off":
        return "module", "engine.torch.hybrid_engine is off"
    if device_type != "cuda":
        device = device_type.upper()
        if hybrid_engine == "on":
            raise RuntimeError(
                f"the DeepSpeed Hybrid Engine cannot run on {device} (for {model_type}: "
                f"{_CPU_FAILURE}); set engine.torch.hybrid_engine: auto or off")
        return "module", (f"the DeepSpeed Hybrid Engine cannot run on {device} (for "
                          f"{model_type}: {_CPU_FAILURE}); generating through the module")
    return "hybrid_engine", f"hybrid_engine: {hybrid_engine} on CUDA"


def _is_hybrid_engine(engine: Any) -> bool:
    return type(engine).__name__ == "DeepSpeedHybridEngine"


def try_hybrid_engine_generate(
    engine: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> GenerationOutput:
    """Generate with ``engine.generate`` of a DeepSpeed Hybrid Engine.

    Sampling here is Hugging Face's with torch's RNG, not the parity sampler: no
    uniforms. An engine that is not a Hybrid Engine, and any exception ``engine.generate``
    raises (the refusals measured on CPU are in the module docstring; others differ by
    model, DeepSpeed and transformers version), become :class:`HybridEngineUnavailable`
    naming it, the original chained. Bad arguments are checked first and raise ValueError.
    """
    _check_prompts(prompt_ids, prompt_mask, max_new_tokens)
    if not _is_hybrid_engine(engine):
        raise HybridEngineUnavailable(
            f"{type(engine).__name__} is not a DeepSpeed Hybrid Engine; initialise it with "
            "make_ds_config(enable_hybrid_engine=True)")
    module = unwrap_model(engine)
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    kwargs: dict[str, Any] = dict(
        attention_mask=prompt_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=zero3,
        return_dict_in_generate=True, output_logits=True)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    model_type = module.config.model_type
    # The Hybrid Engine swaps in its inference forwards while generating and swaps the
    # training ones back only in train(): DS-Chat's eval() -> generate -> train() cycle.
    was_training = engine.training
    engine.eval()
    try:
        with torch.no_grad():
            out = engine.generate(prompt_ids, **kwargs)
    except Exception as err:
        raise HybridEngineUnavailable(
            f"the DeepSpeed Hybrid Engine could not generate for {model_type}: "
            f"engine.generate raised {_refusal(err)}") from err
    finally:
        engine.train(was_training)
    return generation_output_from_hf(out.sequences, out.logits, prompt_ids, prompt_mask,
                                     max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                     pad_token_id=pad_token_id)


def generate_rollout(
    engine: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    hybrid_engine: str = "auto",
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    uniforms: np.ndarray | torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rollout_decode: str = "module",
) -> tuple[GenerationOutput, str]:
    """Generate rollouts along the path :func:`select_rollout_path` picks; log it.

    Returns the output and the path taken ("hybrid_engine" or "module"). Under ``auto``
    an engine that is not a Hybrid Engine, or a Hybrid Engine that refuses to generate
    (:class:`HybridEngineUnavailable`, whatever DeepSpeed raised), falls back to
    :func:`generate` with a warning that says why; under ``on`` both raise that error.
    ``uniforms`` and ``rollout_decode`` (the decode loop, see :func:`generate`) concern only
    the module path.
    """
    module = unwrap_model(engine)
    device_type = next(module.parameters()).device.type
    path, reason = select_rollout_path(hybrid_engine, device_type=device_type,
                                       model_type=module.config.model_type)
    sampling = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                    top_k=top_k, top_p=top_p)
    if path == "hybrid_engine":
        try:
            output = try_hybrid_engine_generate(engine, prompt_ids, prompt_mask, **sampling)
        except HybridEngineUnavailable as err:
            if hybrid_engine == "on":
                raise HybridEngineUnavailable(
                    f"engine.torch.hybrid_engine is on, but {err}; set it to auto (falls "
                    "back to the module path) or off") from err
            path, reason = "module", f"falling back from the Hybrid Engine: {err}"
            say_once(logger, logging.WARNING, "rollout path: module (%s)", reason)
        else:
            say_once(logger, logging.INFO, "rollout path: hybrid_engine (%s)", reason,
                     console=False)
            return output, path
    else:
        say_once(logger, logging.INFO, "rollout path: module (%s)", reason, console=False)
    return generate(engine, prompt_ids, prompt_mask, uniforms=uniforms,
                    rollout_decode=rollout_decode, **sampling), path
