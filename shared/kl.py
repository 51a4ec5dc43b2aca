"""Per-token estimators of KL(pi || pi_ref) from log-probabilities of sampled tokens.

With p = log pi(y_t | ...) and q = log pi_ref(y_t | ...) at the sampled token y_t ~ pi,
and r = q - p (J. Schulman, "Approximating KL Divergence", 2020,
http://joschu.net/blog/kl-approx.html):

  k1   p - q                     unbiased, can be negative (DeepSpeed-Chat, TRL, OpenRLHF)
  abs  |p - q|                   NeMo-Aligner `use_absolute_kl`
  k2   (p - q)^2 / 2             biased, non-negative, low variance
  k3   exp(r) - r - 1            unbiased, non-negative, low variance (verl `low_var_kl`)
"""

from __future__ import annotations

from shared._array import Array, check_choice, check_same_shape, namespace

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")


def kl_penalty(
    logprobs: Array,
    ref_logprobs: Array,
    *,
    estimator: str,
    clamp: float | None = None,
) -> Array:
    """Per-token KL estimate between the policy and the reference (module docstring).

    Args:
      logprobs: [B, T] log pi(y_t | x, y_<t) of the sampled tokens.
      ref_logprobs: [B, T] log pi_ref(y_t | x, y_<t), same tokens, detached.
      estimator: "k1", "abs", "k2" or "k3".
      clamp: if given, the estimate is clipped to [-clamp, clamp] (verl clamps k3
        to +-10).

    Returns:
      [B, T] estimates, unmasked (callers mask).

    Source: Schulman 2020 (above); OpenRLHF `compute_approx_kl`; verl `kl_penalty`.
    """
    xp = namespace(logprobs, ref_logprobs)
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    check_choice("estimator", estimator, KL_ESTIMATORS)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be positive or None, got {clamp!r}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "abs":
        kl = xp.abs(log_ratio)
    elif estimator == "k2":
        kl = 0.5 * log_ratio * log_ratio
    else:
        kl = xp.exp(-log_ratio) + log_ratio - 1.0
    if clamp is not None:
        kl = xp.clip(kl, -clamp, clamp)
    return kl
