"""Hugging Face models for the torch backend: tokenizers, policies, value models.

Every model is an ordinary ``transformers`` model so that what we save is an ordinary
Hugging Face directory:

- the policy (SFT model, PPO actor and reference) is ``AutoModelForCausalLM``;
- the reward model and the PPO critic are ``AutoModelForSequenceClassification`` with
  ``num_labels=1`` wrapped in :class:`ValueModel`, which reads the score head at every
  token. The head is ``Linear(H, 1, bias=False)`` over the backbone's last hidden state,
  with H = ``word_embed_proj_dim`` for OPT and ``hidden_size`` otherwise: exactly
  DeepSpeed-Chat's ``RewardModel.v_head`` (``dschat/utils/model/reward_model.py``).

Positions follow Hugging Face ``generate`` for left padding everywhere (training
forwards, value forwards and the sampler): ``position_ids = cumsum(attention_mask) - 1``
clamped at 0, so a sequence's numbers never depend on how much padding precedes it.

LoRA lives in ``torch_rlhf.lora``; ZeRO-3 gathering and saving in ``torch_rlhf.saving``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from shared.errors import check_model_source, loading

__all__ = [
    "ValueModel",
    "build_causal_lm",
    "build_value_model",
    "causal_lm_logits",
    "takes_logits_to_keep",
    "check_reward_tokenizer",
    "enable_checkpointing",
    "gather_end_values",
    "text_end_scores",
    "load_tokenizer",
    "position_ids_from_mask",
    "torch_dtype",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# transformers renamed `torch_dtype` to `dtype` in 4.56 and deprecated the old name.
_DTYPE_KWARG = (
    "dtype"
    if tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2]) >= (4, 56)
    else "torch_dtype"
)


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a config dtype name (fp32, bf16, fp16)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: {dtype!r} is invalid; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``nn.Module`` inside a DeepSpeed engine; any other module unchanged."""
    deepspeed = sys.modules.get("deepspeed")  # no engine can exist unless it was imported
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] = cumsum(attention_mask) - 1, clamped at 0 (HF generate's rule)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(
    name_or_path: str,
    *,
    end_of_conversation_token: str | None = None,
    padding_side: str = "right",
    trust_remote_code: bool = False,
):
    """Load a tokenizer with ``AutoTokenizer`` and make sure it can pad.

    A tokenizer without a pad token gets one, with a warning: its eos token (what
    DeepSpeed-Chat does), else a new ``<pad>`` token (then the model's embeddings must
    grow: pass ``vocab_size=len(tokenizer)`` to the model builders).

    Args:
      name_or_path: a local directory or a hub name.
      end_of_conversation_token: added as a special token when missing (DS-Chat
        ``--end_of_conversation_token`` with ``--add_eot_token``).
      padding_side: "right" for SFT and reward batches. PPO prompts are left-padded by
        the data layer itself, so the tokenizer's side never decides rollout padding.
      trust_remote_code: passed to ``from_pretrained``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: {padding_side!r} is invalid; allowed: left, right")
    check_model_source(name_or_path, what="tokenizer")
    with loading("tokenizer", name_or_path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )
    tokenizer.padding_side = padding_side
    if end_of_conversation_token and end_of_conversation_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([end_of_conversation_token], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            logger.warning("tokenizer %s has no pad token; using its eos token %r as pad",
                           name_or_path, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer %s has neither pad nor eos token; adding '<pad>'",
                           name_or_path)
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def check_reward_tokenizer(actor_tokenizer, reward_tokenizer, *,
                           retokenize_for_reward: bool = False) -> bool:
    """Whether the reward model can read the actor's token ids as they are.

    True when both tokenizers have the same vocabulary (token -> id map). With different
    vocabularies, returns False if ``retokenize_for_reward`` (the trainer then decodes
    the actor's tokens and re-encodes them for the reward model), else raises a
    ValueError naming both tokenizers.
    """
    if reward_tokenizer is None or reward_tokenizer is actor_tokenizer:
        return True
    actor_vocab, reward_vocab = actor_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
    if actor_vocab == reward_vocab:
        return True
    names = (f"actor tokenizer {actor_tokenizer.name_or_path!r} ({len(actor_vocab)} tokens) "
             f"and reward tokenizer {reward_tokenizer.name_or_path!r} ({len(reward_vocab)} "
             "tokens)")
    if retokenize_for_reward:
        logger.info("%s differ; rollouts are re-tokenised for the reward model", names)
        return False
    differing = sorted(set(actor_vocab.items()) ^ set(reward_vocab.items()))[:3]
    raise ValueError(
        f"the {names} have different vocabularies (e.g. {differing}), so the reward model "
        "cannot score the actor's token ids; use one tokenizer for both or set "
        "model.retokenize_for_reward: true"
    )


# --------------------------------------------------------------------------- models


def _dropout_probability(dropout: float | None, disable_dropout: bool) -> float | None:
    # An explicit value wins (DS-Chat --actor_dropout); else disable_dropout sets 0.
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: {dropout!r} is invalid; must be in [0, 1)")
        return float(dropout)
    return 0.0 if disable_dropout else None


def _set_dropout(config: transformers.PretrainedConfig, p: float) -> None:
    # Every float attribute named *dropout* or *_pdrop: OPT's dropout/attention_dropout/
    # activation_dropout, GPT-2's resid/embd/attn_pdrop, Llama's attention_dropout.
    for key, value in config.to_dict().items():
        named = "dropout" in key or key.endswith("_pdrop")
        if named and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, p)


def _build_hf(auto_cls, name_or_path: str | None, *, config_dict: Mapping[str, Any] | None,
              dtype: str, dropout: float | None, disable_dropout: bool,
              gradient_checkpointing: bool, trust_remote_code: bool, vocab_size: int | None,
              pad_token_id: int | None, attn_implementation: str | None,
              ds_config: Mapping[str, Any] | None, **config_overrides: Any):
    if (name_or_path is None) == (config_dict is None):
        raise ValueError("give exactly one of name_or_path (load weights) and config_dict "
                         f"(build from scratch); got {name_or_path!r} and {config_dict!r}")
    if name_or_path is not None:
        check_model_source(name_or_path, what="model")
        with loading("model", name_or_path):
            config = transformers.AutoConfig.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, **config_overrides)
    else:
        sizes = dict(config_dict)
        if "model_type" not in sizes:
            raise ValueError(f"config_dict needs a `model_type` key (llama, opt, gpt2); "
                             f"got keys {sorted(sizes)}")
        config = transformers.AutoConfig.for_model(sizes.pop("model_type"), **sizes,
                                                   **config_overrides)
    p = _dropout_probability(dropout, disable_dropout)
    if p is not None:
        _set_dropout(config, p)
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    if attn_implementation is None and not torch.cuda.is_available():
        attn_implementation = "eager"  # exact, reproducible numerics on CPU
    kwargs = {_DTYPE_KWARG: torch_dtype(dtype), "attn_implementation": attn_implementation,
              "trust_remote_code": trust_remote_code}
    with _zero3_init(ds_config):
        if name_or_path is not None:
            with loading("model", name_or_path):
                model = auto_cls.from_pretrained(name_or_path, config=config, **kwargs)
        else:
            model = auto_cls.from_config(config, **kwargs)
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            # Grow only (DS-Chat resizes to 8 * ceil(len(tokenizer) / 8) unconditionally,
            # which can also shrink a padded vocabulary).
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=8)
    if p is not None:  # modules that hard-code their probability
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


@contextlib.contextmanager
def _zero3_init(ds_config: Mapping[str, Any] | None) -> Iterator[None]:
    # Under ZeRO-3, transformers builds the model inside deepspeed.zero.Init while a
    # HfDeepSpeedConfig is alive, so each rank only ever holds its shard. Scoped to the
    # build, as DS-Chat's create_hf_model does, to avoid global effects.
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(dict(ds_config))  # noqa: F841 (held by a weakref)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def enable_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing on a Hugging Face model."""
    # Non-reentrant: works when no input requires grad (LoRA-only training).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_causal_lm(
    name_or_path: str | None = None,
    *,
    config_dict: Mapping[str, Any] | None = None,
    dtype: str = "fp32",
    dropout: float | None = None,
    disable_dropout: bool = True,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
    ds_config: Mapping[str, Any] | None = None,
) -> transformers.PreTrainedModel:
    """A causal LM: ``from_pretrained(name_or_path)`` or ``from_config(config_dict)``.

    Args:
      name_or_path: local directory or hub name to load weights from.
      config_dict: instead, Hugging Face config kwargs (``model_type`` plus sizes) for a
        randomly initialised model.
      dtype: fp32 | bf16 | fp16 parameters.
      dropout: set every dropout probability (config and ``nn.Dropout``) to this value.
      disable_dropout: with ``dropout`` unset, set every dropout probability to 0.
      gradient_checkpointing: recompute activations in backward (non-reentrant).
      vocab_size: the tokenizer's length; the embeddings grow to a multiple of 8 that
        holds it when they are smaller (never shrink).
      pad_token_id: written to ``config.pad_token_id``.
      attn_implementation: None: "eager" on CPU (exact numerics), the HF default on CUDA.
      ds_config: the DeepSpeed config the model will run under; with ZeRO-3 its weights
        are partitioned while they load (``deepspeed.zero.Init``), so no rank ever holds
        the whole model. Needs torch.distributed initialised.
    """
    return _build_hf(
        transformers.AutoModelForCausalLM, name_or_path, config_dict=config_dict, dtype=dtype,
        dropout=dropout, disable_dropout=disable_dropout,
        gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
        vocab_size=vocab_size, pad_token_id=pad_token_id,
        attn_implementation=attn_implementation, ds_config=ds_config,
    )


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM inside ``model`` (a DeepSpeed engine, a peft wrapper or the
    Hugging Face model) accepts ``logits_to_keep`` (every transformers 5 causal LM does)."""
    module = unwrap_model(model)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    # Per class: the check runs before every rollout and PPO forward.
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def causal_lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     *, positions: slice | None = None) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM with left-padding-invariant positions.

    ``positions``: only these positions, ``[B, len(range), V]``, with the LM head applied to
    them alone where the model supports it (Hugging Face's ``logits_to_keep``, given the
    index tensor): PPO needs the answer's logits only, and the head is a third of a small
    model's FLOPs and its output the largest activation of the backward.
    """
    kwargs = {}
    keep = None
    if positions is not None:
        keep = torch.arange(input_ids.shape[1], device=input_ids.device)[positions]
        if takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **kwargs).logits
    if keep is not None and "logits_to_keep" not in kwargs:
        logits = logits[:, keep]
    return logits


def text_end_scores(model: nn.Module, reward_tokenizer, texts: list[str], *,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """[B] float32 end scores of ``texts`` by a reward model with its own tokenizer: each
    text encoded by ``shared.reward_text.encode_reward_texts`` (its EOS appended, right-padded)
    and the value of its last real token. The in-process reward (`torch_rlhf.ppo`) and a
    served one (`torch_rlhf.serving`'s ``score_text``) both call this."""
    from shared.reward_text import encode_reward_texts

    ids, mask = (torch.from_numpy(a).to(device)
                 for a in encode_reward_texts(reward_tokenizer, texts))
    values = model(ids, mask).float()  # [B, T]
    return values.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]


def gather_end_values(values: torch.Tensor, attention_mask: torch.Tensor, *,
                      prompt_length: int) -> torch.Tensor:
    """Value [B] at the last token before the first padding of the answer part.

    The answer part is ``[prompt_length:]``; with no padding there the last token (T - 1)
    is taken, with an empty answer the last prompt token. This is DeepSpeed-Chat's
    ``forward_value`` end score, which searches ``input_ids[prompt_length:] == PAD_ID``;
    a mask built as ``input_ids != pad_token_id`` gives the same index.

    Args:
      values: [B, T] per-token values.
      attention_mask: [B, T], 1 on real tokens.
      prompt_length: P >= 1, the (padded) prompt width.
    """
    length = values.shape[-1]
    if not 1 <= prompt_length <= length:
        raise ValueError(f"prompt_length must be in [1, {length}], got {prompt_length}")
    answer_pad = attention_mask[:, prompt_length:] == 0  # [B, T - P]
    first_pad = torch.where(answer_pad.any(-1), answer_pad.int().argmax(-1),
                            torch.full_like(answer_pad[:, 0], length - prompt_length,
                                            dtype=torch.long))
    end = (prompt_length + first_pad - 1)[:, None]  # [B, 1]
    return values.gather(-1, end)[:, 0]


class ValueModel(nn.Module):
    """Reward model / critic: a sequence-classification model read at every token.

    ``self.model`` is an ``AutoModelForSequenceClassification`` with ``num_labels=1``;
    its ``score`` Linear (no bias) is applied to every position of the backbone's last
    hidden state (after OPT's ``project_out``), so a saved value model is a standard
    Hugging Face directory whose own ``forward`` scores the last non-pad token.
    """

    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"ValueModel needs num_labels=1, got {model.config.num_labels}")
        self.model = model

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self.model.config

    def gradient_checkpointing_enable(self) -> None:
        enable_checkpointing(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values [B, T] for ``input_ids`` [B, T]."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [B, T, H]
        return self.model.score(hidden).squeeze(-1)  # [B, T]

    def end_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   prompt_length: int) -> torch.Tensor:
        """Scores [B]: the value at the answer's last token (see :func:`gather_end_values`)."""
        values = self(input_ids, attention_mask)
        return gather_end_values(values, attention_mask, prompt_length=prompt_length)


def build_value_model(
    name_or_path: str | None = None,
    *,
    config_dict: Mapping[str, Any] | None = None,
    dtype: str = "fp32",
    dropout: float | None = None,
    disable_dropout: bool = True,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
    ds_config: Mapping[str, Any] | None = None,
) -> ValueModel:
    """A :class:`ValueModel` (arguments as :func:`build_causal_lm`).

    From a causal-LM directory (the SFT model) the backbone is loaded and the score head
    freshly initialised: the reward model's starting point. From a saved reward model
    the head is loaded too: the PPO critic starts as the reward model (DS-Chat's
    ``create_critic_model(rlhf_training=True)``).
    """
    model = _build_hf(
        transformers.AutoModelForSequenceClassification, name_or_path, config_dict=config_dict,
        dtype=dtype, dropout=dropout, disable_dropout=disable_dropout,
        gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
        vocab_size=vocab_size, pad_token_id=pad_token_id,
        attn_implementation=attn_implementation, ds_config=ds_config, num_labels=1,
    )
    return ValueModel(model)
