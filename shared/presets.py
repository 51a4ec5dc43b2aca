"""PPO conventions: every formula choice that differs between RLHF frameworks, as one
frozen dataclass, and named presets reproducing each framework.

Where each preset's formulas come from:

- `deepspeed_chat`: microsoft/DeepSpeedExamples, applications/DeepSpeed-Chat,
  dschat/rlhf/ppo_trainer.py (`DeepSpeedPPOTrainer.__init__` constants kl_ctl=0.1,
  clip_reward_value=5, cliprange=0.2, cliprange_value=0.2, gamma=1, lam=0.95;
  `compute_rewards`, `train_rlhf`'s zeroing after `ends`, `get_advantages_and_returns`,
  `actor_loss_fn`, `critic_loss_fn`). No whitening, token-mean losses.
- `nemo`: NVIDIA/NeMo-Aligner, examples/nlp/gpt/conf/gpt_ppo_actor.yaml
  (initial_policy_kl_penalty=0.01, use_absolute_kl=True, discount_factor=1.0,
  gae_lambda=0.95, normalize_advantages=True, entropy_bonus=0.0, ratio_eps=0.2),
  gpt_ppo_critic.yaml (loss_clip_val=0.2), nemo_aligner/utils/ppo_utils.py (reward on
  the last valid token, GAE over mask-multiplied rewards/values) and the actor/critic
  losses in megatron_gpt_ppo_actor.py / megatron_gpt_critic.py (0.5 * masked mean).
  NeMo normalises advantages with its own global mean/var; `masked_whiten` is used.
- `openrlhf`: OpenRLHF/OpenRLHF, openrlhf/cli/train_ppo*.py defaults
  (init_kl_coef=0.01, kl_estimator k1, reward_clip_range=(-10, 10), gamma=1,
  lambd=0.95, eps_clip=0.2, value_clip=0.2; later releases changed the defaults to
  lambd=1 and value_clip=0.5, override those fields to follow them),
  openrlhf/models/utils.py
  (`compute_reward`: score on the last action token), experience_maker.py (GAE over
  mask-multiplied rewards/values, advantage normalisation), models/loss.py
  (`PolicyLoss`, `ValueLoss` = 0.5 * clipped).
- `trl`: huggingface/trl, trl/trainer/ppo_config.py defaults (kl_coef=0.05,
  kl_estimator k1, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1, lam=0.95,
  whiten_rewards=False) and ppo_trainer.py: score at `sequence_lengths_p1` (the same
  one-past-the-end slot as DeepSpeed-Chat, hence reward_position "dschat"), KL zero on
  padding, values zeroed after that slot, advantages whitened over the response mask,
  critic loss vf_coef * 0.5 * max(...) -> value_loss_scale 0.05. Not reproduced:
  TRL's value loss also covers the score slot (its `padding_mask_p1`), and
  `missing_eos_penalty`.
- `default`: this project's own choices, each explained in `_DEFAULT_REASONS`.
- `old_logprobs` (the PPO ratio's old log-probs) is "recompute" in every preset. What each
  framework does: DeepSpeed-Chat recomputes (ppo_trainer.py `generate_experience` runs
  `self.actor_model(seq, attention_mask)` after `_generate_sequence`); OpenRLHF recomputes
  (experience_maker.py: `action_log_probs = self.actor(sequences, ...)`); NeMo-Aligner
  recomputes (megatron_gpt_ppo_actor.py `infer` runs a forward over the generated
  sequences for `logprobs`); verl recomputes by default (ray_trainer.py "recompute
  old_log_probs": `actor_rollout_wg.compute_log_prob`) and can use the rollout engine's
  log-probs instead (its rollout-correction "bypass" mode); TRL's `PPOTrainer` takes them
  from the generation logits (ppo_trainer.py: `logitss` from `batch_generation`, divided by
  the temperature, then `selective_log_softmax`), which `old_logprobs="rollout"`
  reproduces (here at temperature 1 on both sides). The `trl` preset keeps "recompute" so
  that every preset trains the parity-tested way; set the field to follow TRL.
- critic-free (`advantage_estimator` other than "gae"; no critic is built): `grpo`,
  `dr_grpo`, `dapo`, `rloo`, `reinforce_plus_plus`, `gspo`, each with its paper and the
  framework settings it follows in its docstring below (formulas in docs/algorithms.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shared.advantages import GAE_MASK_MODES
from shared.aggregation import AGG_MODES
from shared.kl import KL_ESTIMATORS
from shared.rewards import SCORE_POSITIONS
from shared.rollout_correction import RATIO_LEVELS

KL_IN = ("reward", "loss")
KL_CONTROLLERS = ("fixed", "adaptive")
ACCUMULATION_SCALINGS = ("global", "micro_batch_mean")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus")
CRITIC_FREE_ESTIMATORS = ADVANTAGE_ESTIMATORS[1:]
"""Estimators that need no critic (and so build none)."""
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
"""Estimators whose baseline is the other answers to the same prompt (the group layout)."""
POLICY_LOSSES = ("ppo", "gspo")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
OLD_LOGPROBS = ("recompute", "rollout")


@dataclass(frozen=True)
class PPOConventions:
    """Every convention the 'experience -> advantages -> losses' pipeline depends on."""

    kl_estimator: str = "k1"
    """Per-token KL estimator: "k1" (log p - log q), "abs", "k2" or "k3" (`kl_penalty`)."""
    kl_clamp: float | None = None
    """Clip each per-token KL estimate to [-kl_clamp, kl_clamp]; None = no clip."""
    kl_in: str = "reward"
    """"reward": -kl_coef * KL in the token rewards; "loss": kl_coef * KL added to the
    actor loss (`kl_loss`) and no KL in the rewards."""
    kl_coef: float = 0.05
    """KL coefficient beta (the initial one for the adaptive controller)."""
    kl_controller: str = "fixed"
    """"fixed" or "adaptive" (Ziegler et al. 2019; `adaptive_kl_controller`)."""
    kl_target: float = 6.0
    """Target KL of the adaptive controller (Ziegler et al. 2019 use 6 nats)."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive controller (Ziegler et al. 2019 use 10000)."""
    reward_clip: float | None = None
    """Clip the reward-model score to [-reward_clip, reward_clip]; None = no clip."""
    reward_position: str = "last_token"
    """Where the score goes: "last_token" or "dschat" (one past the end, `score_position`)."""
    zero_after_end: bool = False
    """True: keep the KL term on every slot up to the score position, masked or not
    (DeepSpeed-Chat); False: KL only on valid response tokens."""
    gae_mask_mode: str = "skip_masked"
    """"zero_after_end" (DeepSpeed-Chat/OpenRLHF/NeMo/TRL) or "skip_masked" (verl/Tunix)."""
    gamma: float = 1.0
    """Discount factor in [0, 1]."""
    lam: float = 0.95
    """GAE lambda in [0, 1]."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the batch (`masked_whiten`)."""
    whiten_rewards: bool = False
    """Scale token rewards to unit variance without shifting the mean (TRL option)."""
    clip_low: float = 0.2
    """PPO ratio clip epsilon (lower side, and both sides when clip_high is None)."""
    clip_high: float | None = None
    """Upper-side epsilon for asymmetric clipping (DAPO); None = symmetric."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages; None = off."""
    log_ratio_clamp: float | None = None
    """Clip log(pi/pi_old) to [-c, c] before exp; None = off."""
    value_clip: float | None = 0.2
    """Value clipping range around the rollout values; None = unclipped value loss."""
    value_loss_scale: float = 0.5
    """Multiplier of the value loss (0.5 * max(...) in most frameworks)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the actor loss)."""
    loss_agg_mode: str = "token-mean"
    """Loss aggregation (`aggregate_loss`): token-mean, seq-mean-token-mean, ..."""
    accumulation_scaling: str = "global"
    """How an optimiser step of several micro-batches is normalised: "global" divides every
    micro-batch's loss by the whole step's count (the gradient never depends on how the step
    is split); "micro_batch_mean" averages each micro-batch's own mean (DeepSpeed's
    gradient-accumulation scaling, as DeepSpeed-Chat trains)."""
    mask_pad_tokens: bool = False
    """True: a sampled token equal to the pad id is never part of the response (DeepSpeed-Chat's
    `action_mask = ids != pad`): with pad == EOS the EOS is masked, in the forwards and the
    losses, and the score slot is one earlier. False: the EOS always counts as a real token."""
    trim_answer_width: bool = False
    """True: the rollout is cut to its longest answer before the advantages (DeepSpeed-Chat's
    `generate` stops once every row has finished), so the longest row's one-past-the-end score
    slot falls back on its last token; False: always `max_answer_seq_len` slots."""
    shuffle_minibatches: bool = True
    """Visit the rollout buffer in a fresh seeded order every PPO epoch; False walks it in
    order, as DeepSpeed-Chat does (`ppo.shuffle_minibatches` in the config)."""
    advantage_estimator: str = "gae"
    """"gae" (a critic; `gae_advantages`) or a critic-free outcome estimator over each
    answer's summed token reward (`shared.critic_free`): "grpo" (group mean and std,
    Shao et al. 2024), "dr_grpo" (group mean only, Liu et al. 2025), "rloo" (leave-one-out
    mean, Ahmadian et al. 2024; `ppo.n_samples_per_prompt` >= 2) or "reinforce_plus_plus"
    (discounted returns whitened over the batch, Hu 2025). Every estimator but gae runs
    without a critic."""
    policy_loss: str = "ppo"
    """"ppo" (token-level clipped ratio, `policy_loss`) or "gspo" (the clip on each answer's
    length-normalised sequence ratio, Zheng et al. 2025; `gspo_policy_loss`)."""
    rollout_correction: str = "none"
    """The sampler's recorded log-probs against the training forward's
    (`shared.rollout_correction`): "none"; "tis" weights every token's policy loss by
    min(rho, rollout_correction_threshold) (Yao et al. 2025); "mis" drops from the loss the
    tokens (or rows, by `rollout_correction_level`) whose rho lies outside
    [1 / threshold, threshold]."""
    rollout_correction_threshold: float = 2.0
    """C of TIS's truncation and MIS's acceptance band (verl's rollout_is_threshold 2)."""
    rollout_correction_level: str = "token"
    """The ratio rho: "token", "sequence" (product over the answer) or "geometric" (its
    per-token geometric mean)."""
    old_logprobs: str = "recompute"
    """The PPO ratio's old log-probs: "recompute" runs the actor's training forward over the
    rollout (DeepSpeed-Chat, OpenRLHF, NeMo-Aligner, verl by default); "rollout" takes the
    log-probs the sampler recorded (temperature 1, unfiltered, as the training forward
    computes them) and skips that forward (TRL's `PPOTrainer`, verl's rollout log-probs),
    checked against a recomputation every `ppo.old_logprobs_check_interval` iterations and
    falling back to "recompute" when the gap exceeds `ppo.old_logprobs_max_gap`
    (`shared.old_logprobs`). Every preset keeps "recompute"."""

    def __post_init__(self) -> None:
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("kl_in", self.kl_in, KL_IN)
        _choice("kl_controller", self.kl_controller, KL_CONTROLLERS)
        _choice("reward_position", self.reward_position, SCORE_POSITIONS)
        _choice("gae_mask_mode", self.gae_mask_mode, GAE_MASK_MODES)
        _choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _choice("accumulation_scaling", self.accumulation_scaling, ACCUMULATION_SCALINGS)
        _choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        _choice("rollout_correction_level", self.rollout_correction_level, RATIO_LEVELS)
        _choice("old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        _check(_finite(self.rollout_correction_threshold)
               and self.rollout_correction_threshold > 1, "rollout_correction_threshold",
               self.rollout_correction_threshold, "a finite number > 1")
        for name in ("zero_after_end", "whiten_advantages", "whiten_rewards", "mask_pad_tokens",
                     "trim_answer_width", "shuffle_minibatches"):
            _choice(name, getattr(self, name), (True, False))
        for name in ("kl_clamp", "reward_clip", "clip_high", "log_ratio_clamp", "value_clip"):
            _positive_or_none(name, getattr(self, name))
        # `math.isfinite` first: NaN fails every comparison, but an infinity passes `>= 0`.
        _check(_finite(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef,
               "a finite number >= 0")
        _check(_finite(self.kl_target) and self.kl_target > 0, "kl_target", self.kl_target,
               "a finite number > 0")
        _check(_finite(self.kl_horizon) and self.kl_horizon > 0, "kl_horizon", self.kl_horizon,
               "a finite number > 0")
        _check(_finite(self.gamma) and 0 <= self.gamma <= 1, "gamma", self.gamma,
               "a number in [0, 1]")
        _check(_finite(self.lam) and 0 <= self.lam <= 1, "lam", self.lam, "a number in [0, 1]")
        _check(_finite(self.clip_low) and 0 < self.clip_low < 1, "clip_low", self.clip_low,
               "a number in (0, 1)")
        _check(
            self.dual_clip is None or (_finite(self.dual_clip) and self.dual_clip > 1),
            "dual_clip", self.dual_clip, "None or a finite number > 1",
        )
        _check(_finite(self.value_loss_scale) and self.value_loss_scale > 0, "value_loss_scale",
               self.value_loss_scale, "a finite number > 0")
        _check(_finite(self.entropy_coef) and self.entropy_coef >= 0, "entropy_coef",
               self.entropy_coef, "a finite number >= 0")
        if self.trim_answer_width and self.whiten_rewards:
            raise ValueError(
                "PPOConventions.trim_answer_width computes each generation batch's rewards on "
                "its own width, so whiten_rewards (over the whole buffer) cannot be combined "
                "with it; set one of them to False"
            )
        if self.trim_answer_width and self.advantage_estimator != "gae":
            raise ValueError(
                f"PPOConventions.trim_answer_width cuts each generation batch to its own width "
                f"before GAE; advantage_estimator {self.advantage_estimator!r} computes its "
                "advantages over the whole buffer: set trim_answer_width to False"
            )
        if self.old_logprobs == "rollout" and self.rollout_correction != "none":
            raise ValueError(
                f"PPOConventions.old_logprobs='rollout' makes the old log-probs the sampler's, "
                f"so rollout_correction={self.rollout_correction!r} (their ratio to the "
                "training forward's) would always be 1: use old_logprobs='recompute' with it"
            )
        if self.old_logprobs == "rollout" and self.zero_after_end:
            raise ValueError(
                "PPOConventions.zero_after_end keeps the KL on slots after the answer, where "
                "the sampler records no log-prob (0), so old_logprobs='rollout' would change "
                "that KL: use old_logprobs='recompute' with zero_after_end"
            )
        if self.reward_position == "dschat" and self.gae_mask_mode == "skip_masked":
            raise ValueError(
                "reward_position='dschat' puts the score on a padding slot, which "
                "gae_mask_mode='skip_masked' would skip; use gae_mask_mode='zero_after_end'"
            )


def _choice(name: str, value: object, allowed: tuple) -> None:
    if isinstance(value, bool) != all(isinstance(a, bool) for a in allowed) or value not in allowed:
        raise ValueError(
            f"PPOConventions.{name} = {value!r} is not allowed; allowed values: {list(allowed)}"
        )


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"PPOConventions.{name} = {value!r} is not allowed; expected {allowed}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_or_none(name: str, value: float | None) -> None:
    _check(value is None or (_finite(value) and value > 0), name, value,
           "None or a finite number > 0 (None disables it)")


DEEPSPEED_CHAT = PPOConventions(
    kl_estimator="k1",
    kl_in="reward",
    kl_coef=0.1,
    kl_controller="fixed",
    reward_clip=5.0,
    reward_position="dschat",
    zero_after_end=True,
    gae_mask_mode="zero_after_end",
    gamma=1.0,
    lam=0.95,
    whiten_advantages=False,
    whiten_rewards=False,
    clip_low=0.2,
    value_clip=0.2,
    value_loss_scale=0.5,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
    accumulation_scaling="micro_batch_mean",
    mask_pad_tokens=True,
    trim_answer_width=True,
    shuffle_minibatches=False,
)

NEMO = PPOConventions(
    kl_estimator="abs",
    kl_coef=0.01,
    reward_clip=None,
    reward_position="last_token",
    zero_after_end=False,
    gae_mask_mode="zero_after_end",
    gamma=1.0,
    lam=0.95,
    whiten_advantages=True,
    clip_low=0.2,
    value_clip=0.2,
    value_loss_scale=0.5,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
)

OPENRLHF = PPOConventions(
    kl_estimator="k1",
    kl_coef=0.01,
    reward_clip=10.0,
    reward_position="last_token",
    zero_after_end=False,
    gae_mask_mode="zero_after_end",
    gamma=1.0,
    lam=0.95,
    whiten_advantages=True,
    clip_low=0.2,
    value_clip=0.2,
    value_loss_scale=0.5,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
)

TRL = PPOConventions(
    kl_estimator="k1",
    kl_coef=0.05,
    reward_clip=None,
    reward_position="dschat",
    zero_after_end=False,
    gae_mask_mode="zero_after_end",
    gamma=1.0,
    lam=0.95,
    whiten_advantages=True,
    whiten_rewards=False,
    clip_low=0.2,
    value_clip=0.2,
    value_loss_scale=0.05,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
)

DEFAULT = PPOConventions(
    kl_estimator="k1",
    kl_in="reward",
    kl_coef=0.05,
    kl_controller="fixed",
    reward_clip=10.0,
    reward_position="last_token",
    zero_after_end=False,
    gae_mask_mode="skip_masked",
    gamma=1.0,
    lam=0.95,
    whiten_advantages=True,
    whiten_rewards=False,
    clip_low=0.2,
    clip_high=None,
    dual_clip=None,
    log_ratio_clamp=20.0,
    value_clip=0.2,
    value_loss_scale=0.5,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
)
"""The project's own conventions (reasons in `_DEFAULT_REASONS`)."""

GRPO = PPOConventions(
    advantage_estimator="grpo",
    kl_estimator="k3",
    kl_in="loss",
    kl_coef=0.04,
    kl_controller="fixed",
    reward_clip=None,
    reward_position="last_token",
    gae_mask_mode="skip_masked",
    whiten_advantages=False,
    clip_low=0.2,
    log_ratio_clamp=20.0,
    entropy_coef=0.0,
    loss_agg_mode="seq-mean-token-mean",
)
"""GRPO (Shao et al. 2024, arXiv:2402.03300, eqs. 3-4): group-normalised outcome advantages,
no critic, the KL to the reference as a loss term with the k3 estimator and beta 0.04, the
per-answer token mean then the mean over answers; verl's `algorithm.adv_estimator=grpo`
with `use_kl_loss`, `kl_loss_type=low_var_kl`."""

DR_GRPO = replace(GRPO, advantage_estimator="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm")
"""Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, sec. 3.1): GRPO without the std division and
with a constant length normaliser (the answer budget); verl `norm_adv_by_std_in_grpo=False`,
`loss_agg_mode=seq-mean-token-sum-norm`."""

DAPO = replace(GRPO, kl_coef=0.0, clip_high=0.28, loss_agg_mode="token-mean")
"""DAPO (Yu et al. 2025, arXiv:2503.14476): GRPO's advantages without a KL term (sec. 2.3),
clip-higher eps_low 0.2 / eps_high 0.28 (sec. 3.1) and the token-level loss (sec. 3.3).
Dynamic sampling and overlong shaping are not built."""

RLOO = replace(GRPO, advantage_estimator="rloo", kl_estimator="k1", kl_in="reward",
               kl_coef=0.05, loss_agg_mode="token-mean")
"""RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6): the leave-one-out baseline, the KL
(k1, beta 0.05) in the reward as TRL's `RLOOTrainer`."""

REINFORCE_PLUS_PLUS = replace(GRPO, advantage_estimator="reinforce_plus_plus",
                              kl_estimator="k1", kl_in="reward", kl_coef=0.01,
                              reward_clip=10.0, loss_agg_mode="token-mean")
"""REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted returns of the KL-penalised token
rewards (k1, beta 0.01) whitened over the global batch, OpenRLHF's defaults
(`init_kl_coef=0.01`, `reward_clip_range=(-10, 10)`)."""

GSPO = replace(GRPO, policy_loss="gspo", kl_coef=0.0, clip_low=3e-4, clip_high=4e-4)
"""GSPO (Zheng et al. 2025, arXiv:2507.18071 v2, sec. 5.1): GRPO's advantages with the clip
on the length-normalised sequence ratio at 3e-4 / 4e-4, no KL term, seq-mean-token-mean
(verl's GSPO recipe)."""

_DEFAULT_REASONS = {
    "kl_estimator": "k1 in the reward: unbiased, and its sum over tokens is the sequence "
    "log-ratio whose expectation is the KL of InstructGPT's objective",
    "kl_coef": "0.05, TRL's default, between DeepSpeed-Chat's 0.1 and OpenRLHF's 0.01",
    "reward_clip": "10, OpenRLHF's guard against reward-model outliers; loose enough not "
    "to bind for a normalised reward model",
    "reward_position": "last_token: the score belongs to the token that ends the answer "
    "(the EOS when generated), never one past it",
    "gae_mask_mode": "skip_masked: identical to zero_after_end for prefix masks and still "
    "correct when masked tokens sit inside a response",
    "whiten_advantages": "True, as TRL, OpenRLHF, NeMo and verl: scale-free policy updates",
    "log_ratio_clamp": "20, as verl: only guards exp() against overflow, inactive for sane "
    "ratios",
    "value_clip": "0.2 with 0.5 * max(...), the value loss shared by every framework here",
    "loss_agg_mode": "token-mean with a global token count: split-invariant, and the "
    "common choice",
    "accumulation_scaling": "global: the gradient of a step never depends on how it is split "
    "into micro-batches, ranks or shards (DeepSpeed's per-micro-batch means weight a short "
    "micro-batch's tokens more)",
    "mask_pad_tokens": "False: the EOS the policy chose is an action and gets its log-prob, "
    "KL and score whatever the tokenizer's pad id is",
    "trim_answer_width": "False: static shapes (one compiled step), and the score slot of a "
    "row never depends on the other rows of its batch",
    "shuffle_minibatches": "True: a fresh seeded order per PPO epoch decorrelates the "
    "mini-batches, as OpenRLHF, TRL and verl do",
}

PRESETS: dict[str, PPOConventions] = {
    "default": DEFAULT,
    "deepspeed_chat": DEEPSPEED_CHAT,
    "nemo": NEMO,
    "openrlhf": OPENRLHF,
    "trl": TRL,
    "grpo": GRPO,
    "dr_grpo": DR_GRPO,
    "dapo": DAPO,
    "rloo": RLOO,
    "reinforce_plus_plus": REINFORCE_PLUS_PLUS,
    "gspo": GSPO,
}


def get_preset(name: str, **overrides: object) -> PPOConventions:
    """The preset called `name`, with optional field overrides (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown PPO preset {name!r}; available presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

