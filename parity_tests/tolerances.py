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
    "bf16_rollout_logprobs": (
        0.25,
        0.0,
        "Level 5 with ppo.rollout_dtype bfloat16: log-probs recorded by a bf16 sampler "
        "(bf16 weights, activations and KV cache; fp32 log-softmax) against the fp32 training "
        "forward, or against the other backend's bf16 sampler where the tokens agree. bf16 "
        "keeps 8 bits of mantissa (u = 3.9e-3), and the two backends round different "
        "intermediates (fused XLA kernels vs torch's per-op bf16 results); measured <= 0.073 "
        "nats (Llama, OPT, GPT-2 tiny models, 3 prompt batches x 16 steps), backend vs "
        "backend <= 0.045. This is the gap TIS/MIS (conventions.rollout_correction) "
        "corrects, not a numerical error; the bound is ~3x the measured maximum.",
    ),
    "optimiser_params": (
        1e-5,
        1e-5,
        "Level 4, parameters after N AdamW steps (clip, decoupled decay, shared schedule) from "
        "the same weights on the same batches, per HF tensor: Adam divides each gradient "
        "entry by its running RMS, so a step moves every weight by ~lr whatever the "
        "gradient's size and the level-3 gradient differences enter relative to each entry; "
        "measured <= 1.1e-6 absolute, 7.4e-7 of the tensor's max-norm (3 steps, lr 1e-2, "
        "every family) on weights of O(1).",
    ),
    "optimiser_zero_grad": (
        5e-3,
        0.0,
        "Level 4, attention key biases (OPT k_proj.bias, the key third of GPT-2's c_attn.bias) "
        "after the AdamW steps: their exact gradient is 0 (softmax is invariant to q . b_k), "
        "each backend's is rounding noise of ~1e-9 that Adam normalises to an update of up "
        "to ~lr per step in a noise-given direction. Bound: the summed learning rates of the "
        "steps (1.2e-2 for LEVEL4_OPTIM, 3 steps) halved; measured 2.2e-3 (OPT), 1.6e-3 "
        "(GPT-2). Every other parameter is held to `optimiser_params`.",
    ),
    "iteration_metrics": (
        2e-5,
        5e-5,
        "Level 6, per-step metrics of whole runs (3 SFT steps, 3 reward-model steps, 3 PPO "
        "iterations of 2 x 2 actor and critic steps): the level-2/3 rounding carried through "
        "every optimiser step of the run (level 4) and into the next rollout's scores; the "
        "sampled tokens stay identical, so nothing is amplified by a different sample; "
        "measured over every level-6 case (each preset, both short-answer policies, both ptx "
        "modes, gradient accumulation, LoRA) <= 5.7e-6 absolute (pre-clip gradient norms of "
        "O(10)), <= 5e-6 relative on metrics away from 0.",
    ),
    "iteration_params": (
        1e-5,
        1e-5,
        "Level 6, final parameters of the SFT model, reward model, PPO actor, critic and EMA "
        "per HF tensor: as `optimiser_params`, over 3 to 24 optimiser steps; measured over "
        "every level-6 case <= 6.5e-6 absolute (the actor's embedding, whose EOS channel holds "
        "2.0), 1.6e-6 of the tensor's max-norm. Entries torch itself cannot reproduce are "
        "held to `iteration_params_sensitive` instead.",
    ),
    "iteration_params_sensitive": (
        1.6e-2,
        0.0,
        "Level 6, the final parameter entries that torch itself cannot reproduce to "
        "`iteration_params`: two torch runs whose initial weights are perturbed by 1e-6 "
        "(relative, the size of the backends' gradient differences) move them by more than "
        "that tolerance. Adam divides each gradient entry by its running RMS, so an entry whose "
        "gradient is near 0 at some step (a cancellation over tokens, as the key biases of "
        "level 4) moves by up to ~lr in a direction rounding picks. Bound: the largest summed "
        "learning rate of a level-6 model halved (the critic: 12 cosine steps from 5e-3, "
        "3.25e-2); such entries (0 to ~20 of ~20000 per model, all in the critic so far) "
        "moved by up to 1.5e-3 between torch runs, and differed between the backends by up to "
        "2.5e-5 (a user config, temperature 0.9) and 4.8e-6 (the level-6 cases). Every other "
        "entry is held to `iteration_params`.",
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
