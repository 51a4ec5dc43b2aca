"""Per-token log-probabilities and entropies from logits.

Convention (shared by SFT and PPO): `logits[b, t]` is the distribution that predicts
`labels[b, t]`; the caller has already shifted, i.e. for a causal LM over `input_ids`
it passes `logits[:, :-1]` and `labels = input_ids[:, 1:]` (DeepSpeed-Chat's
`gather_log_probs(logits[:, :-1, :], seq[:, 1:])`).
"""

from __future__ import annotations

from shared._array import Array, check_dtype, check_rank, log_softmax, logsumexp, namespace


def token_logprobs(logits: Array, labels: Array) -> Array:
    """Log-probability of each label under its logits: log softmax(logits)[label].

    logp[b, t] = logits[b, t, labels[b, t]] - logsumexp_v logits[b, t, v].

    Args:
      logits: [B, T, V] unnormalised scores; index t predicts labels[b, t].
      labels: [B, T] integer token ids. Ids outside [0, V) (e.g. the -100 ignore
        index) are clipped into range, so their log-prob is meaningless: mask them.

    Returns:
      [B, T] log-probabilities, dtype of `logits`.

    Source: DeepSpeed-Chat `gather_log_probs`; OpenRLHF `log_probs_from_logits`
    (label logit minus logsumexp, which avoids materialising the [B, T, V] log_softmax).
    """
    xp = namespace(logits, labels)
    check_rank(logits, 3, "logits", "[B, T, V]")
    check_rank(labels, 2, "labels", "[B, T]")
    check_dtype(xp, logits, "real floating", "logits")
    check_dtype(xp, labels, "integral", "labels")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"labels must have shape [B, T] = {tuple(logits.shape[:2])} matching logits, "
            f"got {tuple(labels.shape)}"
        )
    vocab = logits.shape[-1]
    safe_labels = xp.clip(labels, 0, vocab - 1)
    label_logits = xp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    return label_logits - logsumexp(xp, logits, axis=-1)


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of the softmax distribution at each position: H = -sum_v p_v log p_v.

    Computed from the max-shifted log_softmax, so it is finite for any finite logits.

    Args:
      logits: [B, T, V] unnormalised scores.

    Returns:
      [B, T] entropies in nats.

    Source: the entropy bonus of PPO (Schulman et al. 2017, eq. 9); NeMo-Aligner
    `calculate_entropy`; verl `entropy_from_logits`.
    """
    xp = namespace(logits)
    check_rank(logits, 3, "logits", "[B, T, V]")
    log_p = log_softmax(xp, logits, axis=-1)
    return -xp.sum(xp.exp(log_p) * log_p, axis=-1)
