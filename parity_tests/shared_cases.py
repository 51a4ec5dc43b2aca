"""Level 1: every public function of `shared` on numpy, torch and jitted JAX, one table row each.

A `Case` names the function, builds its array inputs (float32, int64 ids, 0/1 masks) from a
seeded generator and a padding side, and fixes its keyword arguments. `case_rows` runs it on
numpy (the reference), on torch and under `jax.jit` in JAX, and compares every output leaf.
`EXEMPT` lists the public names with no array to compare, each with the reason; a test checks
that CASES and EXEMPT together cover `shared`'s public names exactly, so a new function cannot
be added without a parity row.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

import shared
from parity_tests.harness import Row, compare
from parity_tests.tolerances import tolerance

__all__ = ["CASES", "EXEMPT", "Case", "case_rows", "covered_names", "public_names"]

B_, T_, V_ = 3, 6, 7  # batch, response length, vocabulary of the level-1 inputs
LENGTHS = (6, 4, 1)  # valid tokens per row


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One row of the level-1 table."""

    name: str  # "function" or "function(variant)"
    fn: Callable[..., Any]  # takes the arrays positionally, kwargs are bound below
    inputs: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, ...]]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    covers: tuple[str, ...] = ()  # public names exercised besides the one in `name`
    tolerance: str = "shared_fp32"

    @property
    def function(self) -> str:
        return self.name.split("(")[0]


def response_mask(padding: str, lengths: tuple[int, ...] = LENGTHS, width: int = T_
                  ) -> np.ndarray:
    """[B, T] 0/1 float32 mask with `lengths` valid entries per row on the given side."""
    t = np.arange(width)[None, :]
    n = np.asarray(lengths)[:, None]
    mask = t < n if padding == "right" else t >= width - n
    return mask.astype(np.float32)


def _f(rng, *shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _logits(rng, m):
    return (_f(rng, B_, T_, V_, scale=2.0),)


def _logits_labels(rng, m):
    return _f(rng, B_, T_, V_, scale=2.0), rng.integers(0, V_, (B_, T_))


def _x_mask(rng, m):
    return _f(rng, B_, T_, scale=3.0) + 1.0, m


def _mask(rng, m):
    return (m,)


def _two_logprobs(rng, m):
    lp = -np.abs(_f(rng, B_, T_))
    return lp, lp + _f(rng, B_, T_, scale=0.5)


def _rewards_inputs(rng, m):
    lp, ref = _two_logprobs(rng, m)
    return _f(rng, B_, scale=8.0), lp, ref, m


def _gae_inputs(rng, m):
    return _f(rng, B_, T_), _f(rng, B_, T_), m


def _policy_inputs(rng, m):
    old = -np.abs(_f(rng, B_, T_))
    return old + _f(rng, B_, T_, scale=0.3), old, _f(rng, B_, T_), m


def _value_inputs(rng, m):
    old = _f(rng, B_, T_)
    return old + _f(rng, B_, T_, scale=0.3), old, _f(rng, B_, T_), m


def _ppo_inputs(rng, m):
    lp, old, adv, _ = _policy_inputs(rng, m)
    v, old_v, ret, _ = _value_inputs(rng, m)
    entropy = np.abs(_f(rng, B_, T_))
    return lp, old, adv, v, old_v, ret, m, entropy, old + _f(rng, B_, T_, scale=0.2)


def _ppo_losses(lp, old, adv, v, old_v, ret, m, entropy, ref, **kwargs):
    return shared.ppo_losses(lp, old, adv, v, old_v, ret, m, entropy=entropy, ref_logprobs=ref,
                             **kwargs)


def _advantage_inputs(rng, m):
    scores, lp, ref, _ = _rewards_inputs(rng, m)
    return scores, lp, ref, _f(rng, B_, T_), m


def _scores_mask(rng, m):
    return _f(rng, B_, scale=2.0), m


def _remax_inputs(rng, m):
    return _f(rng, B_, scale=2.0), _f(rng, B_, scale=2.0), m


def _rewards_kl(rng, m):
    x, _ = _x_mask(rng, m)
    return x, m, np.abs(_f(rng, B_, T_, scale=0.2))


def _rpp_returns(rewards, mask, kl, **kwargs):
    return shared.reinforce_plus_plus_returns(rewards, mask, kl=kl, **kwargs)


def _rpp_moments(rewards, mask, kl, **kwargs):
    # A shard whitened with moments counted over a larger (here: doubled) batch.
    returns = shared.reinforce_plus_plus_returns(rewards, mask, kl=kl, **kwargs)
    moments = shared.whitening_moments(returns, mask) * 2.0 + 1.0
    return shared.reinforce_plus_plus_advantages(rewards, mask, kl=kl, moments=moments, **kwargs)


def _weighted_policy_inputs(rng, m):
    return (*_policy_inputs(rng, m), np.abs(_f(rng, B_, T_)) + 0.5)


def _weighted(loss_fn):
    def fn(lp, old, adv, m, w, **kwargs):
        return loss_fn(lp, old, adv, m, importance_weights=w, **kwargs)
    return fn


def _gap_inputs(rng, m):
    return (*_two_logprobs(rng, m), m)


def _dpo_inputs(rng, m):
    return tuple(-np.abs(_f(rng, B_, scale=4.0)) for _ in range(4))


def _sft_inputs(rng, m):
    logits, labels = _logits_labels(rng, m)
    return logits, labels, m


def _attention_and_prompt(rng, m):
    attention = m.astype(np.int64)
    prompt = ((np.cumsum(attention, axis=-1) <= 2) & (attention == 1)).astype(np.int64)
    return attention, prompt


def _attention_and_lengths(rng, m):
    return m.astype(np.int64), np.array([2, 1, 3])


def _pairwise_scores(rng, m):
    return _f(rng, B_, scale=2.0), _f(rng, B_, scale=2.0), np.abs(_f(rng, B_, scale=0.5))


def _dschat_inputs(rng, m):
    ids = rng.integers(3, V_ + 3, (B_, T_))
    chosen = np.where(m == 1, ids, 0)
    rejected = chosen.copy()
    rejected[:, T_ // 2 :] = rng.integers(3, V_ + 3, (B_, T_ - T_ // 2))
    rejected = np.where(np.roll(m, -1, axis=-1) * m == 1, rejected, 0)  # one token shorter
    rejected[2] = chosen[2]  # an identical pair: DS-Chat's last-token branch
    return _f(rng, B_, T_), _f(rng, B_, T_), chosen, rejected


def _ranking_inputs(rng, m):
    return _f(rng, B_, 4, scale=2.0), np.array([4, 2, 3])


def _sample_inputs(rng, m):
    return _f(rng, B_, V_, scale=2.0), rng.uniform(0.02, 0.98, B_).astype(np.float32)


def _kl_update(current_kl, n_steps, *, controller):
    state = controller.init()
    return controller.update(state, current_kl=current_kl, n_steps=n_steps).kl_coef


def _kl_inputs(rng, m):
    return np.asarray(rng.uniform(2.0, 12.0), np.float32), np.asarray(64.0, np.float32)


def _ema_update(a, b, *, beta):
    averager = shared.ema(beta=beta)
    params = {"w": a, "layers": [b, a * 2.0]}
    state = averager.init(params)
    return averager.update(state, shared.tree_map(lambda x: x + 1.0, params)).ema


def _tree_map(a, b):
    return shared.tree_map(lambda x, y: x * y - 1.0, {"a": a, "b": (b, a)}, {"a": b, "b": (a, b)})


def _steps(rng, m):
    return (np.array([0, 3, 10, 49, 100, 150]),)


def _schedule(step, *, make, **kwargs):
    return make(**kwargs)(step)


def _controller(step_kl, n_steps, *, preset):
    return _kl_update(step_kl, n_steps, controller=shared.make_kl_controller(preset))


_ADAPTIVE = shared.adaptive_kl_controller(init_kl_coef=0.1, target=6.0, horizon=10000.0)
_WITH_ALL = dataclasses.replace(shared.get_preset("default"), entropy_coef=0.01, kl_in="loss",
                                dual_clip=3.0, clip_high=0.28, loss_agg_mode="seq-mean-token-mean")
_DSCHAT = shared.get_preset("deepspeed_chat")
_ADAPTIVE_PRESET = dataclasses.replace(_DSCHAT, kl_controller="adaptive", whiten_rewards=True,
                                       trim_answer_width=False)

CASES: tuple[Case, ...] = (
    Case("token_logprobs", shared.token_logprobs, _logits_labels),
    Case("entropy_from_logits", shared.entropy_from_logits, _logits),
    Case("masked_sum", shared.masked_sum, _x_mask),
    Case("masked_sum(axis=-1)", shared.masked_sum, _x_mask, {"axis": -1}),
    Case("masked_mean", shared.masked_mean, _x_mask),
    Case("masked_mean(axis=-1)", shared.masked_mean, _x_mask, {"axis": -1}),
    Case("masked_var", shared.masked_var, _x_mask),
    Case("masked_var(biased, axis=-1)", shared.masked_var, _x_mask,
         {"unbiased": False, "axis": -1}),
    Case("masked_whiten", shared.masked_whiten, _x_mask),
    Case("masked_whiten(keep mean)", shared.masked_whiten, _x_mask, {"shift_mean": False}),
    Case("loss_normalizer(token-mean)", shared.loss_normalizer, _mask, {"mode": "token-mean"}),
    Case("loss_normalizer(seq-mean)", shared.loss_normalizer, _mask,
         {"mode": "seq-mean-token-mean"}),
    *(Case(f"aggregate_loss({mode})", shared.aggregate_loss, _x_mask, {"mode": mode})
      for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                   "seq-mean-token-sum-norm")),
    Case("aggregate_loss(normalizer)", shared.aggregate_loss, _x_mask,
         {"mode": "token-mean", "normalizer": 25.0}),
    *(Case(f"kl_penalty({est})", shared.kl_penalty, _two_logprobs, {"estimator": est})
      for est in ("k1", "abs", "k2", "k3")),
    Case("kl_penalty(k3, clamp)", shared.kl_penalty, _two_logprobs,
         {"estimator": "k3", "clamp": 0.05}),
    Case("score_position(last_token)", shared.score_position, _mask,
         {"position": "last_token"}, tolerance="exact"),
    Case("score_position(dschat)", shared.score_position, _mask, {"position": "dschat"},
         tolerance="exact"),
    Case("episode_mask(dschat)", shared.episode_mask, _mask, {"position": "dschat"},
         tolerance="exact"),
    Case("shape_rewards", shared.shape_rewards, _rewards_inputs,
         {"kl_coef": 0.1, "reward_clip": 5.0}),
    Case("shape_rewards(dschat)", shared.shape_rewards, _rewards_inputs,
         {"kl_coef": 0.1, "kl_estimator": "k3", "kl_clamp": 1.0, "position": "dschat",
          "zero_after_end": True}),
    Case("gae_advantages(skip_masked)", shared.gae_advantages, _gae_inputs,
         {"gamma": 0.99, "lam": 0.95}),
    Case("gae_advantages(zero_after_end)", shared.gae_advantages, _gae_inputs,
         {"gamma": 1.0, "lam": 0.9, "mask_mode": "zero_after_end"}),
    Case("discounted_returns", shared.discounted_returns, _x_mask, {"gamma": 0.9}),
    Case("policy_loss", shared.policy_loss, _policy_inputs, {"clip_low": 0.2}),
    Case("policy_loss(dual, asym, clamp)", shared.policy_loss, _policy_inputs,
         {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 2.0, "log_ratio_clamp": 0.25,
          "agg_mode": "seq-mean-token-sum"}),
    Case("value_loss", shared.value_loss, _value_inputs, {"clip_range": 0.2}),
    Case("value_loss(unclipped)", shared.value_loss, _value_inputs, {"scale": 0.05}),
    Case("entropy_bonus(logits)", shared.entropy_bonus, lambda r, m: (*_logits(r, m), m)),
    Case("entropy_bonus(entropy)", shared.entropy_bonus, _x_mask,
         {"agg_mode": "seq-mean-token-mean"}),
    Case("kl_loss", shared.kl_loss, lambda r, m: (*_two_logprobs(r, m), m)),
    Case("ppo_ptx_objective", shared.ppo_ptx_objective,
         lambda r, m: (np.float32(1.5), np.float32(2.25)), {"unsup_coef": 27.8}),
    Case("compute_advantages(default)", shared.compute_advantages, _advantage_inputs,
         {"conventions": shared.get_preset("default")}),
    Case("compute_advantages(deepspeed_chat)", shared.compute_advantages, _advantage_inputs,
         {"conventions": _DSCHAT, "kl_coef": 0.2}),
    Case("compute_advantages(whiten rewards)", shared.compute_advantages, _advantage_inputs,
         {"conventions": _ADAPTIVE_PRESET}),
    Case("critic_loss(default)", shared.critic_loss, _value_inputs,
         {"conventions": shared.get_preset("default")}),
    Case("critic_loss(dschat, normalizer)", shared.critic_loss, _value_inputs,
         {"conventions": _DSCHAT, "normalizer": 6.0}),
    Case("ppo_losses(default)", _ppo_losses, _ppo_inputs,
         {"conventions": shared.get_preset("default")}),
    Case("ppo_losses(every term)", _ppo_losses, _ppo_inputs,
         {"conventions": _WITH_ALL, "normalizer": 6.0}),
    Case("grpo_advantages", shared.grpo_advantages, _scores_mask, {"group_size": 3}),
    Case("grpo_advantages(dr_grpo)", shared.grpo_advantages, _scores_mask,
         {"group_size": 3, "scale_by_std": False}),
    Case("grpo_advantages(n=1)", shared.grpo_advantages, _scores_mask, {"group_size": 1}),
    Case("rloo_advantages", shared.rloo_advantages, _scores_mask, {"group_size": 3}),
    Case("remax_advantages", shared.remax_advantages, _remax_inputs),
    Case("reinforce_plus_plus_returns(kl)", _rpp_returns, _rewards_kl,
         {"gamma": 0.9, "kl_coef": 0.1}),
    Case("reinforce_plus_plus_advantages", shared.reinforce_plus_plus_advantages, _x_mask,
         {"gamma": 1.0}),
    Case("reinforce_plus_plus_advantages(global moments)", _rpp_moments, _rewards_kl,
         {"gamma": 0.95, "kl_coef": 0.05}, covers=("whitening_moments",)),
    Case("whitening_moments", shared.whitening_moments, _x_mask),
    Case("gspo_policy_loss", shared.gspo_policy_loss, _policy_inputs,
         {"clip_low": 0.2, "clip_high": 0.28}),
    Case("gspo_policy_loss(weights, token-mean)", _weighted(shared.gspo_policy_loss),
         _weighted_policy_inputs, {"clip_low": 0.1, "agg_mode": "token-mean",
                                   "normalizer": 20.0}),
    Case("policy_loss(importance weights)", _weighted(shared.policy_loss),
         _weighted_policy_inputs, {"clip_low": 0.2, "clip_high": 0.28}),
    *(Case(f"tis_weights({level})", shared.tis_weights, _gap_inputs,
           {"threshold": 1.5, "level": level}) for level in ("token", "sequence", "geometric")),
    Case("mis_mask(token)", shared.mis_mask, _gap_inputs, {"threshold": 1.5},
         tolerance="exact"),
    Case("mis_mask(geometric)", shared.mis_mask, _gap_inputs,
         {"threshold": 1.2, "level": "geometric"}, tolerance="exact"),
    Case("rollout_logprob_gap", shared.rollout_logprob_gap, _gap_inputs, {"threshold": 0.3}),
    Case("sequence_logprobs", shared.sequence_logprobs, _x_mask),
    Case("sequence_logprobs(average)", shared.sequence_logprobs, _x_mask, {"average": True}),
    Case("dpo_loss(sigmoid)", shared.dpo_loss, _dpo_inputs, {"beta": 0.1}),
    Case("dpo_loss(cdpo)", shared.dpo_loss, _dpo_inputs,
         {"beta": 0.5, "label_smoothing": 0.2, "normalizer": 6.0}),
    Case("dpo_loss(ipo)", shared.dpo_loss, _dpo_inputs, {"beta": 0.5, "loss_type": "ipo"}),
    Case("bradley_terry_loss", shared.bradley_terry_loss, lambda r, m: _pairwise_scores(r, m)[:2]),
    Case("bradley_terry_loss(margin)", shared.bradley_terry_loss,
         lambda r, m: _pairwise_scores(r, m)[:2], {"margin": 0.5}),
    Case("dschat_pairwise_loss", shared.dschat_pairwise_loss, _dschat_inputs,
         {"pad_token_id": 0}),
    Case("dschat_pairwise_loss(opt padding)", shared.dschat_pairwise_loss, _dschat_inputs,
         {"pad_token_id": 0, "num_padding_at_beginning": 1}),
    Case("kway_ranking_loss", lambda s, n: shared.kway_ranking_loss(s, num_valid=n),
         _ranking_inputs),
    Case("sft_loss", shared.sft_loss, _sft_inputs),
    Case("sft_loss(seq-mean)", shared.sft_loss, _sft_inputs,
         {"agg_mode": "seq-mean-token-mean", "normalizer": 3.0}),
    Case("sft_loss_mask(prompt mask)", shared.sft_loss_mask, _attention_and_prompt,
         {"train_on_prompt": False}, tolerance="exact"),
    Case("sft_loss_mask(prompt lengths)", shared.sft_loss_mask, _attention_and_lengths,
         {"train_on_prompt": True}, tolerance="exact"),
    Case("short_answer_mask", shared.short_answer_mask, _mask, {"min_tokens": 2},
         tolerance="exact"),
    Case("filter_logits", shared.filter_logits, lambda r, m: _sample_inputs(r, m)[:1],
         {"temperature": 0.7, "top_k": 5, "top_p": 0.8}),
    Case("sample_token", shared.sample_token, _sample_inputs,
         {"temperature": 1.3, "top_k": 6, "top_p": 0.9}, tolerance="exact"),
    Case("sample_token(greedy)", shared.sample_token, _sample_inputs, {"do_sample": False},
         tolerance="exact"),
    Case("fixed_kl_controller", _kl_update, _kl_inputs,
         {"controller": shared.fixed_kl_controller(kl_coef=0.1)}),
    Case("adaptive_kl_controller", _kl_update, _kl_inputs, {"controller": _ADAPTIVE}),
    Case("make_kl_controller", _controller, _kl_inputs, {"preset": _ADAPTIVE_PRESET}),
    Case("ema", _ema_update, lambda r, m: (_f(r, 4, 3), _f(r, 3)), {"beta": 0.9}),
    Case("tree_map", _tree_map, lambda r, m: (_f(r, 2, 3), _f(r, 2, 3))),
    Case("constant_schedule", _schedule, _steps,
         {"make": shared.constant_schedule, "base_lr": 1e-3, "warmup_steps": 10}),
    Case("linear_schedule", _schedule, _steps,
         {"make": shared.linear_schedule, "base_lr": 1e-3, "warmup_steps": 10,
          "total_steps": 100, "min_lr_ratio": 0.1}),
    Case("cosine_schedule", _schedule, _steps,
         {"make": shared.cosine_schedule, "base_lr": 1e-3, "warmup_steps": 10,
          "total_steps": 100}),
    Case("make_schedule", _schedule, _steps,
         {"make": functools.partial(shared.make_schedule, "cosine"), "base_lr": 2e-3,
          "warmup_steps": 5, "total_steps": 120, "min_lr_ratio": 0.2}),
)

EXEMPT: dict[str, str] = {
    "PRESETS": "configuration data (a dict of PPOConventions), no arrays",
    "PPOConventions": "a frozen dataclass of settings; its effect is in the ppo_losses and "
                      "compute_advantages rows",
    "get_preset": "returns configuration, no arrays",
    "DAPO_CLIP_HIGHER": "hyperparameter data (clip_low/clip_high); its effect is the "
                        "policy_loss(importance weights) row's asymmetric clip",
    "GSPO_CLIP": "hyperparameter data (clip_low/clip_high), no arrays",
    "Ema": "the (init, update) type; exercised by the `ema` row",
    "EmaState": "a NamedTuple type; exercised by the `ema` row",
    "KLController": "the (init, update) type; exercised by the controller rows",
    "KLControllerState": "a NamedTuple type; exercised by the controller rows",
    "sampling_uniforms": "numpy-only by design (keyed PCG64 draws both backends read as numpy); "
                         "no backend variant exists to compare",
    "minibatch_schedule": "numpy-only by design (row indices from Python ints)",
    "ppo_update_counts": "pure Python integer arithmetic",
}
"""Public names of `shared` without a level-1 row, and why."""


def public_names() -> set[str]:
    """The names `shared/__init__.py` re-exports (no submodules, nothing private)."""
    return {name for name, value in vars(shared).items()
            if not name.startswith("_") and not inspect.ismodule(value)}


def covered_names() -> set[str]:
    """Public names with at least one level-1 row."""
    names = set()
    for case in CASES:
        names.add(case.function)
        names.update(case.covers)
    return names


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key in sorted(tree):
            out.update(_leaves(tree[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, item in enumerate(tree):
            out.update(_leaves(item, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _torch_array(x: np.ndarray) -> Any:
    import torch

    x = np.asarray(x)
    if x.dtype.kind == "f":
        return torch.from_numpy(x.astype(np.float32))
    if x.dtype.kind in "iu":
        return torch.from_numpy(x.astype(np.int64))
    return torch.from_numpy(x)


def _jax_array(x: np.ndarray) -> Any:
    import jax.numpy as jnp

    x = np.asarray(x)
    if x.dtype.kind == "f":
        return jnp.asarray(x, jnp.float32)
    if x.dtype.kind in "iu":
        return jnp.asarray(x, jnp.int32)
    return jnp.asarray(x)


@functools.cache
def _jitted(case: Case) -> Callable:
    import jax

    return jax.jit(functools.partial(case.fn, **case.kwargs))


def case_rows(case: Case, padding: str, *, seed: int = 0) -> list[Row]:
    """Rows comparing torch and jitted JAX with numpy for every output leaf of `case`."""
    rng = np.random.default_rng(seed)
    args = tuple(np.asarray(a) for a in case.inputs(rng, response_mask(padding)))
    reference = _leaves(case.fn(*args, **case.kwargs))
    outputs = {
        "torch": _leaves(case.fn(*(_torch_array(a) for a in args), **case.kwargs)),
        "jax": _leaves(_jitted(case)(*(_jax_array(a) for a in args))),
    }
    rows = []
    for backend, leaves in outputs.items():
        for key, expected in reference.items():
            label = f"{case.name}{'.' + key if key else ''} [{backend}, {padding}]"
            if key not in leaves:
                rows.append(Row("1", label, float("inf"), float("inf"),
                                tolerance(case.tolerance), False, f"no output {key!r}"))
                continue
            rows.append(compare("1", label, leaves[key], expected, case.tolerance))
    return rows
