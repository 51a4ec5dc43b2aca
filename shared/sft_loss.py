"""Supervised fine-tuning (next-token cross-entropy) loss and its loss mask.

Convention: labels are ALREADY SHIFTED by the caller, as everywhere in `shared`
(see `shared.logprobs`): for a causal LM over `input_ids` [B, L], pass
`logits[:, :-1]` and `labels = input_ids[:, 1:]`, and build the [B, L - 1] mask with
`sft_loss_mask`, whose index j refers to the token input_ids[:, j + 1].
"""

from __future__ import annotations

from shared._array import Array, as_bool, check_rank, namespace, positions
from shared.aggregation import aggregate_loss
from shared.logprobs import token_logprobs


def sft_loss(
    logits: Array,
    labels: Array,
    loss_mask: Array,
    *,
    agg_mode: str = "token-mean",
    normalizer: Array | float | None = None,
) -> Array:
    """Next-token cross-entropy: agg(-log softmax(logits[b, t])[labels[b, t]]).

    Args:
      logits: [B, T, V]; logits[b, t] predicts labels[b, t] (already shifted).
      labels: [B, T] integer ids (ignore ids such as -100 must be masked out).
      loss_mask: [B, T] float or bool mask of the label positions that count.
      agg_mode, normalizer: see `aggregate_loss` (token-mean with a global token count
        matches Hugging Face's loss over the full batch).

    Returns:
      A scalar loss.

    Source: Radford et al. 2018 (GPT) eq. 1; DeepSpeed-Chat step 1 uses the
    Hugging Face causal-LM loss, the token-mean of this.
    """
    nll = -token_logprobs(logits, labels)
    return aggregate_loss(nll, loss_mask, mode=agg_mode, normalizer=normalizer)


def sft_loss_mask(
    attention_mask: Array, prompt_lengths_or_mask: Array, *, train_on_prompt: bool
) -> Array:
    """Mask over the shifted label positions: mask[b, j] says whether token j + 1 counts.

    mask[b, j] = attention[b, j + 1] and (train_on_prompt or not prompt[b, j + 1]).

    Args:
      attention_mask: [B, L] 1 for real tokens, 0 for padding.
      prompt_lengths_or_mask: [B] integer prompt lengths (prompt = the first
        prompt_lengths[b] positions, i.e. right-padded rows) or a [B, L] float/bool mask
        marking prompt tokens (any padding side).
      train_on_prompt: also train on the prompt tokens (DeepSpeed-Chat step 1 does; most
        chat SFT recipes do not).

    Returns:
      [B, L - 1] bool mask aligned with `labels = input_ids[:, 1:]`.
    """
    xp = namespace(attention_mask, prompt_lengths_or_mask)
    check_rank(attention_mask, 2, "attention_mask", "[B, L]")
    attention = as_bool(xp, attention_mask)
    length = attention_mask.shape[-1]
    if prompt_lengths_or_mask.ndim == 1:
        if prompt_lengths_or_mask.shape[0] != attention_mask.shape[0]:
            raise ValueError(
                f"prompt_lengths_or_mask of shape [B] must have B = {attention_mask.shape[0]}, "
                f"got {tuple(prompt_lengths_or_mask.shape)}"
            )
        t = positions(xp, attention_mask, length, prompt_lengths_or_mask.dtype)
        prompt = t[None, :] < prompt_lengths_or_mask[:, None]
    else:
        check_rank(prompt_lengths_or_mask, 2, "prompt_lengths_or_mask", "[B] or [B, L]")
        if tuple(prompt_lengths_or_mask.shape) != tuple(attention_mask.shape):
            raise ValueError(
                f"prompt_lengths_or_mask of shape [B, L] must match attention_mask "
                f"{tuple(attention_mask.shape)}, got {tuple(prompt_lengths_or_mask.shape)}"
            )
        prompt = as_bool(xp, prompt_lengths_or_mask)
    keep = attention if train_on_prompt else attention & ~prompt
    return keep[:, 1:]
