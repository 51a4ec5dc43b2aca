"""Direct preference optimisation on sequence log-probs of chosen/rejected answers.

With pi the policy, pi_ref the frozen reference, (y_w, y_l) the chosen and rejected answers
and h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]:

  sigmoid  l = -(1 - e) log sigma(beta h) - e log sigma(-beta h)   (e = label smoothing,
                                                                     cDPO; e = 0 is DPO)
  ipo      l = (h - 1 / (2 beta))^2

The implicit rewards are beta (log pi(y) - log pi_ref(y)). dl/dh = -beta sigma(-beta h)
for e = 0, so as beta -> 0 the gradient tends to -beta / 2 (and dl/dh / beta -> -1/2).
"""

from __future__ import annotations

from shared._array import (
    Array,
    as_bool,
    check_choice,
    check_rank,
    check_same_shape,
    log_sigmoid,
    namespace,
    safe_divide,
    scalar,
)
from shared.masked import masked_sum

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(
    logprobs: Array, response_mask: Array, *, average: bool = False
) -> Array:
    """Sum (or mean, `average`) of the answer's token log-probs: log pi(y | x).

    Args:
      logprobs: [B, T] token log-probs of the answer tokens.
      response_mask: [B, T] float or bool mask.
      average: divide by the answer length (TRL does this for IPO).

    Returns:
      [B] sequence log-probs (0 for an empty row).

    Source: TRL `DPOTrainer.concatenated_forward` (sum, or mean for loss_type "ipo").
    """
    xp = namespace(logprobs, response_mask)
    check_rank(logprobs, 2, "logprobs", "[B, T]")
    total = masked_sum(logprobs, response_mask, axis=-1)
    if not average:
        return total
    count = xp.sum(xp.astype(as_bool(xp, response_mask), logprobs.dtype), axis=-1)
    return safe_divide(xp, total, count)


def dpo_loss(
    chosen_logprobs: Array,
    rejected_logprobs: Array,
    ref_chosen_logprobs: Array,
    ref_rejected_logprobs: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    normalizer: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """DPO / cDPO / IPO loss over preference pairs (module docstring for the formulas).

    The loss is sum_b l_b / N with N = `normalizer` (the global number of pairs summed
    over micro-batches and ranks) or this batch's B, so split batches add up exactly.

    Args:
      chosen_logprobs: [B] log pi(y_w | x) (`sequence_logprobs`), differentiable.
      rejected_logprobs: [B] log pi(y_l | x), differentiable.
      ref_chosen_logprobs: [B] log pi_ref(y_w | x), detached.
      ref_rejected_logprobs: [B] log pi_ref(y_l | x), detached.
      beta: > 0, the KL strength (TRL's default 0.1).
      loss_type: "sigmoid" (DPO, cDPO with label_smoothing) or "ipo" (pass
        length-averaged log-probs for TRL's IPO).
      label_smoothing: e in [0, 0.5), the assumed label-flip rate (sigmoid only).
      normalizer: global pair count, default B.

    Returns:
      loss: scalar.
      stats (TRL's names): "rewards/chosen", "rewards/rejected" (means of the implicit
        rewards), "rewards/accuracies" (share with chosen reward > rejected),
        "rewards/margins" (mean chosen - rejected reward); local means over this batch.

    Source: Rafailov et al. 2023 (DPO, arXiv:2305.18290) eq. 7; Mitchell 2023 (cDPO
    note); Azar et al. 2023 (IPO, arXiv:2310.12036) eq. 17; TRL `DPOTrainer.dpo_loss`
    (loss_type "sigmoid"/"ipo", label_smoothing); OpenRLHF `DPOLoss`.
    """
    xp = namespace(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs,
                   ref_rejected_logprobs)
    check_rank(chosen_logprobs, 1, "chosen_logprobs", "[B]")
    for name, x in (("rejected_logprobs", rejected_logprobs),
                    ("ref_chosen_logprobs", ref_chosen_logprobs),
                    ("ref_rejected_logprobs", ref_rejected_logprobs)):
        check_same_shape("chosen_logprobs", chosen_logprobs, name, x)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")

    chosen_ratio = chosen_logprobs - ref_chosen_logprobs
    rejected_ratio = rejected_logprobs - ref_rejected_logprobs
    h = chosen_ratio - rejected_ratio  # [B]
    if loss_type == "sigmoid":
        losses = -log_sigmoid(xp, beta * h)
        if label_smoothing:
            losses = (1.0 - label_smoothing) * losses - label_smoothing * log_sigmoid(
                xp, -beta * h
            )
    else:
        gap = h - 1.0 / (2.0 * beta)
        losses = gap * gap
    if normalizer is None:
        normalizer = float(h.shape[0])
    if isinstance(normalizer, (int, float)):
        normalizer = scalar(xp, float(normalizer), losses)
    loss = safe_divide(xp, xp.sum(losses), xp.astype(normalizer, losses.dtype))

    chosen_rewards = beta * chosen_ratio
    rejected_rewards = beta * rejected_ratio
    stats = {
        "rewards/chosen": xp.mean(chosen_rewards),
        "rewards/rejected": xp.mean(rejected_rewards),
        "rewards/accuracies": xp.mean(xp.astype(chosen_rewards > rejected_rewards, h.dtype)),
        "rewards/margins": xp.mean(chosen_rewards - rejected_rewards),
    }
    return loss, stats
