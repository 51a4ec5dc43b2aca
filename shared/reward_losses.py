"""Reward-model (preference) losses: Bradley-Terry, DeepSpeed-Chat's per-token pairwise
loss, and InstructGPT's K-way ranking loss.

All use a stable log-sigmoid, log sigma(x) = -softplus(-x).
"""

from __future__ import annotations

from shared._array import (
    Array,
    check_dtype,
    check_rank,
    check_same_shape,
    index_dtype,
    log_sigmoid,
    namespace,
    positions,
    safe_divide,
)


def bradley_terry_loss(
    chosen_scores: Array, rejected_scores: Array, *, margin: Array | float | None = None
) -> tuple[Array, dict[str, Array]]:
    """Pairwise preference loss: mean_b -log sigma(s_chosen - s_rejected - margin).

    Args:
      chosen_scores: [B] scores of the preferred responses.
      rejected_scores: [B] scores of the other responses.
      margin: optional [B] array or float subtracted inside (Llama 2 reward model).

    Returns:
      loss: scalar.
      stats: accuracy (share of pairs with s_chosen > s_rejected), chosen_mean,
        rejected_mean, margin_mean (mean of s_chosen - s_rejected).

    Source: Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1 with K = 2;
    Touvron et al. 2023 (Llama 2) eq. 2 for the margin.
    """
    xp = namespace(chosen_scores, rejected_scores, margin)
    check_rank(chosen_scores, 1, "chosen_scores", "[B]")
    check_same_shape("chosen_scores", chosen_scores, "rejected_scores", rejected_scores)
    diff = chosen_scores - rejected_scores
    logits = diff if margin is None else diff - margin
    loss = -xp.mean(log_sigmoid(xp, logits))
    stats = {
        "accuracy": xp.mean(xp.astype(diff > 0, diff.dtype)),
        "chosen_mean": xp.mean(chosen_scores),
        "rejected_mean": xp.mean(rejected_scores),
        "margin_mean": xp.mean(diff),
    }
    return loss, stats


def dschat_pairwise_loss(
    chosen_values: Array,
    rejected_values: Array,
    chosen_ids: Array,
    rejected_ids: Array,
    *,
    pad_token_id: int,
    num_padding_at_beginning: int = 0,
) -> tuple[Array, dict[str, Array]]:
    """DeepSpeed-Chat's reward-model loss (RewardModel.forward), vectorised.

    Per pair b, with k = num_padding_at_beginning:
      c_end = index of the (k+1)-th pad token of chosen_ids[b], else L;
      if the two rows are identical: span = [L - 1, L), r_end = c_end;
      else: r_end likewise for rejected_ids[b], d = first index where they differ,
            span = [d, max(c_end, r_end));
      loss_b = mean_{t in span} -log sigma(chosen_values[b, t] - rejected_values[b, t]).
    loss = mean_b loss_b. End scores: chosen_values[b, c_end - 1] and
    rejected_values[b, r_end - 1] (index -1 wraps to L - 1, as torch indexing does).

    Deviation: a pair whose span is empty (rows differing only after both ends) gives
    NaN in DeepSpeed-Chat (mean of nothing); here it contributes 0.

    Args:
      chosen_values: [B, L] per-token reward-head outputs of the chosen sequences.
      rejected_values: [B, L] same for the rejected sequences.
      chosen_ids: [B, L] token ids (prompt + chosen answer, right-padded).
      rejected_ids: [B, L] token ids (prompt + rejected answer, right-padded).
      pad_token_id: the tokenizer's pad id.
      num_padding_at_beginning: k above (1 for OPT, which starts with a pad-like BOS).

    Returns:
      loss: scalar.
      stats: chosen_end_scores [B], rejected_end_scores [B], accuracy (share of pairs
        whose chosen end score is larger).

    Source: DeepSpeed-Chat dschat/utils/model/reward_model.py (after trlx's
    summarize_rlhf reward model).
    """
    xp = namespace(chosen_values, rejected_values, chosen_ids, rejected_ids)
    check_rank(chosen_values, 2, "chosen_values", "[B, L]")
    check_same_shape("chosen_values", chosen_values, "rejected_values", rejected_values)
    check_same_shape("chosen_values", chosen_values, "chosen_ids", chosen_ids)
    check_same_shape("chosen_values", chosen_values, "rejected_ids", rejected_ids)
    check_dtype(xp, chosen_ids, "integral", "chosen_ids")
    check_dtype(xp, rejected_ids, "integral", "rejected_ids")
    length = chosen_ids.shape[-1]
    idx_dtype = index_dtype(xp)
    t = positions(xp, chosen_ids, length, idx_dtype)[None, :]  # [1, L]
    never = xp.full_like(t, length)

    def end_index(ids: Array) -> Array:
        # Index of the (k+1)-th pad token, else L.
        is_pad = ids == pad_token_id
        nth = xp.cumulative_sum(xp.astype(is_pad, idx_dtype), axis=-1)
        hit = is_pad & (nth == num_padding_at_beginning + 1)
        return xp.min(xp.where(hit, t, never), axis=-1)

    differs = chosen_ids != rejected_ids
    any_diff = xp.any(differs, axis=-1)
    first_diff = xp.min(xp.where(differs, t, never), axis=-1)
    c_end = end_index(chosen_ids)
    r_end = xp.where(any_diff, end_index(rejected_ids), c_end)
    start = xp.where(any_diff, first_diff, xp.full_like(first_diff, length - 1))
    stop = xp.where(any_diff, xp.maximum(c_end, r_end), xp.full_like(c_end, length))

    span = (t >= start[:, None]) & (t < stop[:, None])
    span_f = xp.astype(span, chosen_values.dtype)
    token_loss = -log_sigmoid(xp, chosen_values - rejected_values)
    per_pair = safe_divide(
        xp,
        xp.sum(xp.where(span, token_loss, xp.zeros_like(token_loss)), axis=-1),
        xp.sum(span_f, axis=-1),
    )
    loss = xp.mean(per_pair)

    def value_at(values: Array, end: Array) -> Array:
        last = xp.where(end > 0, end - 1, xp.full_like(end, length - 1))
        pick = t == last[:, None]
        return xp.sum(xp.where(pick, values, xp.zeros_like(values)), axis=-1)

    chosen_end = value_at(chosen_values, c_end)
    rejected_end = value_at(rejected_values, r_end)
    stats = {
        "chosen_end_scores": chosen_end,
        "rejected_end_scores": rejected_end,
        "accuracy": xp.mean(xp.astype(chosen_end > rejected_end, chosen_values.dtype)),
    }
    return loss, stats


def kway_ranking_loss(
    scores: Array, *, num_valid: Array | None = None
) -> tuple[Array, dict[str, Array]]:
    """InstructGPT's K-way ranking loss over all C(K, 2) ordered pairs.

    scores[b] is ordered best-first: response i is preferred to response j for i < j.
    loss_b = (1 / C(n_b, 2)) sum_{i < j < n_b} -log sigma(s_i - s_j), and the loss is the
    mean of loss_b over rows with n_b >= 2 (each prompt's comparisons weigh as one batch
    element, as InstructGPT trains on all C(K, 2) pairs of a prompt together).

    Args:
      scores: [B, K] scores, best first.
      num_valid: optional [B] integer count n_b of valid responses per row (the first
        n_b columns); default K for every row.

    Returns:
      loss: scalar.
      stats: accuracy (share of valid pairs ranked correctly, s_i > s_j), num_pairs.

    Source: Ouyang et al. 2022 (InstructGPT) eq. 1.
    """
    xp = namespace(scores, num_valid)
    check_rank(scores, 2, "scores", "[B, K]")
    k = scores.shape[-1]
    idx_dtype = index_dtype(xp)
    i = positions(xp, scores, k, idx_dtype)
    upper = i[:, None] < i[None, :]  # [K, K], pairs (i, j) with i better than j
    pair_valid = upper[None, :, :]
    if num_valid is not None:
        check_rank(num_valid, 1, "num_valid", "[B]")
        check_dtype(xp, num_valid, "integral", "num_valid")
        n = xp.astype(num_valid, idx_dtype)[:, None, None]
        pair_valid = pair_valid & (i[None, None, :] < n)
    diff = scores[:, :, None] - scores[:, None, :]  # [B, K, K], s_i - s_j
    pair_loss = -log_sigmoid(xp, diff)
    zeros = xp.zeros_like(pair_loss)
    pair_f = xp.astype(pair_valid, scores.dtype)
    pairs_per_row = xp.sum(xp.broadcast_to(pair_f, pair_loss.shape), axis=(1, 2))  # [B]
    row_loss = safe_divide(
        xp, xp.sum(xp.where(pair_valid, pair_loss, zeros), axis=(1, 2)), pairs_per_row
    )
    rows = xp.astype(pairs_per_row > 0, scores.dtype)
    loss = safe_divide(xp, xp.sum(row_loss), xp.sum(rows))
    correct = xp.where(pair_valid, xp.astype(diff > 0, scores.dtype), zeros)
    stats = {
        "accuracy": safe_divide(xp, xp.sum(correct), xp.sum(pairs_per_row)),
        "num_pairs": xp.sum(pairs_per_row),
    }
    return loss, stats
