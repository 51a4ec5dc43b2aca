"""Every tolerance of the parity suite, in one place, each with the reason it has that value.

A comparison passes when ``max|a - b| <= atol + rtol * max|b|`` over the compared entries, `b`
being the reference (numpy for level 1, the torch backend otherwise). The criterion is
norm-wise (max-norm), not element-wise: an element-wise relative error is meaningless on the
many entries of a gradient that are near zero, while a wrong transpose, head order or mask
moves the max-norm of the difference to the size of the quantity itself.

All levels run in float32 on CPU (fp32 unit roundoff u = 6e-8). The values below sit a factor
of ~5-20 above the largest difference measured over every family and padding side (numbers in
docs/parity.md, reproduced by `python -m parity_tests.measure`), and below what a real
discrepancy gives: one entry of one attention kernel of the demo model moved by 1e-3 moves the
logits by 2e-4 and is caught (test_parity_run); a wrong transpose or head order moves them O(1).

Rule: no tolerance is loosened without writing the cause into its reason, with the measured
difference that made it necessary.
"""

from __future__ import annotations

from typing import NamedTuple


class Tolerance(NamedTuple):
    """How close two arrays must be: max|a - b| <= atol + rtol * max|b|."""

    name: str
    atol: float
    rtol: float
    reason: str

    def __str__(self) -> str:
        if self.atol == 0 and self.rtol == 0:
            return "exact"
        return f"atol={self.atol:.0e} rtol={self.rtol:.0e}"


TOLERANCES: dict[str, tuple[float, float, str]] = {
    "exact": (
        0.0,
        0.0,
        "Integers and booleans (indices, masks, token ids, sampled tokens): the same "
        "computation must give the same value, there is no rounding.",
    ),
    "shared_fp32": (
        1e-6,
        1e-5,
        "Level 1, one `shared` function on float32 inputs in numpy, torch and jitted JAX: the "
        "same formula, but XLA fuses and reassociates reductions (sums, logsumexp, cumsum of "
        "GAE) and uses its own exp/log; measured <= 2.4e-6 relative (k3 KL, whitening), 7.6e-6 "
        "absolute on O(10) values.",
    ),
    "logits": (
        1e-5,
        1e-5,
        "Level 2, model outputs on the same fp32 weights: two implementations of the same "
        "network (HF eager attention vs our NNX modules) reassociate matmul and softmax sums "
        "differently; measured <= 3.5e-6 absolute, 1e-6 relative on the tiny families with "
        "weights drawn at std 0.2.",
    ),
    "logprobs": (
        1e-5,
        1e-5,
        "Level 2, token log-probs and entropies: logits differences plus one logsumexp over "
        "the vocabulary; measured <= 2.6e-6 absolute, 7e-7 relative.",
    ),
    "values": (
        1e-5,
        1e-5,
        "Level 2, per-token values and reward end scores: the backbone's last hidden state "
        "times the score head; same rounding as the logits; measured <= 1.7e-6 absolute, "
        "9e-7 relative.",
    ),
    "loss": (
        1e-5,
        1e-5,
        "Level 3, scalar losses and loss statistics (SFT, reward, PPO actor/critic, entropy, "
        "ptx): a reduction of level-2 quantities; measured <= 1.5e-5 absolute on losses of "
        "O(100) (ptx times unsup_coef 27.8), 5e-6 relative on losses away from 0.",
    ),
    "grad": (
        1e-6,
        5e-5,
        "Level 3, gradients per parameter tensor (HF state-dict names): backpropagation "
        "through every layer accumulates the forward differences and sums over batch and "
        "sequence in different orders; per tensor, measured <= 3.6e-6 of the tensor's own "
        "max-norm (tensors with gradients above 1e-3), 3.6e-5 absolute on gradients of O(10); "
        "atol covers tensors whose gradient is ~0.",
    ),
    "rollout_logprobs": (
        1e-5,
        1e-5,
        "Level 5, log-probs recorded while decoding with a KV cache (incremental attention "
        "over cached keys instead of one full forward); the same rounding as level 2; "
        "measured <= 2.4e-6 absolute.",
    ),
}
"""name -> (atol, rtol, reason)."""


def tolerance(name: str) -> Tolerance:
    """The named tolerance; KeyError lists the known names."""
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance {name!r}; known: {', '.join(sorted(TOLERANCES))}")
    atol, rtol, reason = TOLERANCES[name]
    return Tolerance(name, atol, rtol, reason)


def render_table() -> str:
    """The markdown table of every tolerance (docs/parity.md embeds it between markers)."""
    lines = ["| name | atol | rtol | why this value |", "| --- | --- | --- | --- |"]
    for name, (atol, rtol, reason) in TOLERANCES.items():
        lines.append(f"| `{name}` | {atol:g} | {rtol:g} | {reason} |")
    return "\n".join(lines)
