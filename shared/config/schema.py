"""The typed configuration tree: one frozen dataclass per section.

``RLHFConfig`` is the root. Each field carries a comment saying what it does
and, where it has one, the DeepSpeed-Chat argument or NeMo-RLHF key it mirrors
(the full tables are in ``shared.config.aliases`` and ``docs/config.md``).
Values are checked where they are set (``__post_init__``); checks that span
sections live in ``RLHFConfig.__post_init__``. Every error names the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.config._build import ConfigError
from shared.data.config import DataConfig
from shared.presets import CRITIC_FREE_ESTIMATORS, PPOConventions, get_preset

__all__ = [
    "CriticConfig",
    "DPOConfig",
    "EngineConfig",
    "EvalConfig",
    "JaxEngineConfig",
    "LoggingConfig",
    "LoRAConfig",
    "MeshConfig",
    "ModelConfig",
    "ModuleConfig",
    "OptimizerConfig",
    "PPOConfig",
    "RewardConfig",
    "RLHFConfig",
    "SamplingConfig",
    "SFTConfig",
    "TorchEngineConfig",
]

Dtype = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid; {allowed}")


def _check_number(key: str, value: float, low: float, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False, note: str = "") -> None:
    """Refuses NaN, an infinity and anything outside the interval, naming the interval."""
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if math.isinf(high):
        allowed = f"must be a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = (f"must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}"
                   f"{')' if high_open else ']'}")
    _check(ok, key, value, allowed + note)


@dataclass(frozen=True)
class ModelConfig:
    """Which models to load (or build from scratch) for the three steps."""

    # Step-1 initialisation and the PPO actor/reference: a local directory or hub
    # name (DS-Chat --model_name_or_path / --actor_model_name_or_path). null with
    # `actor_config` set builds a fresh model from that config (the demo).
    actor_model_name_or_path: str | None = None
    # Step-2 initialisation and the PPO critic/reward (DS-Chat
    # --critic_model_name_or_path). null with `critic_config` set builds one fresh; null
    # with both null: the actor's base model `actor_model_name_or_path` with a fresh value
    # head (as DS-Chat's step 2 starts from a pretrained base, never from step 1's output);
    # all three null is an error at load.
    critic_model_name_or_path: str | None = None
    # Hugging Face config kwargs (`model_type` plus sizes) for a from-scratch actor.
    actor_config: dict[str, Any] | None = None
    # As `actor_config`, for the reward model / critic backbone.
    critic_config: dict[str, Any] | None = None
    # Tokenizer for every model; defaults to the actor's directory.
    tokenizer_name_or_path: str | None = None
    # The reward model's tokenizer, when it differs from the actor's. Allowed only
    # with `retokenize_for_reward: true` (decode actor tokens, re-encode for the
    # reward model); otherwise a mismatch is an error.
    reward_tokenizer_name_or_path: str | None = None
    # Decode actor tokens and re-encode them with the reward tokenizer.
    retokenize_for_reward: bool = False
    # Parameter/compute dtype of the trained models (DS-Chat --dtype).
    dtype: Dtype = "fp32"
    # Passed to `from_pretrained` (needed by some hub models).
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.actor_model_name_or_path is None and self.actor_config is None:
            raise ConfigError(
                "model.actor_model_name_or_path: null is invalid while model.actor_config is "
                "also null; set a model directory / hub name or a config to build one"
            )
        if self.actor_config is not None and "model_type" not in self.actor_config:
            raise ConfigError("model.actor_config: needs a `model_type` key (llama, opt, gpt2)")
        if (self.critic_model_name_or_path is None and self.critic_config is None
                and self.actor_model_name_or_path is None):
            raise ConfigError(
                "model.critic_model_name_or_path: null is invalid while model.critic_config "
                "and model.actor_model_name_or_path are also null (the reward model defaults "
                "to the actor's base model, and a fresh actor_config is not one); set a reward "
                "model directory / hub name or model.critic_config"
            )
        if self.critic_config is not None and "model_type" not in self.critic_config:
            raise ConfigError("model.critic_config: needs a `model_type` key (llama, opt, gpt2)")
        if self.reward_tokenizer_name_or_path and not self.retokenize_for_reward:
            raise ConfigError(
                "model.reward_tokenizer_name_or_path: a separate reward tokenizer needs "
                "model.retokenize_for_reward: true"
            )

    def reward_model_source(self) -> tuple[str | None, dict[str, Any] | None]:
        """Where the reward model (step 2, and PPO's critic and reward without a trained
        one) starts: ``(path, None)`` to load a directory or hub name, ``(None, hf_config)``
        to build a fresh one.

        The one rule of both backends: ``critic_model_name_or_path``, else a fresh
        ``critic_config``, else the actor's base model ``actor_model_name_or_path`` (a
        fresh value head on it). ``__post_init__`` refuses a config where none is set.
        """
        if self.critic_model_name_or_path is not None:
            return self.critic_model_name_or_path, None
        if self.critic_config is not None:
            return None, self.critic_config
        return self.actor_model_name_or_path, None


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters, applied through peft (torch) or flax NNX LoRA (jax)."""

    # Rank; 0 disables LoRA (DS-Chat --actor_lora_dim / --critic_lora_dim).
    dim: int = 0
    # The update is scaled by alpha / dim (peft's lora_alpha; DS-Chat's lora_scaling=1).
    alpha: float = 1.0
    # Substring selecting the modules to adapt (DS-Chat --*_lora_module_name).
    module_name: str = "decoder.layers."
    # Explicit module-name suffixes (e.g. [q_proj, v_proj]); overrides module_name.
    target_modules: tuple[str, ...] = ()
    # Train only the adapters (DS-Chat --only_optimize_lora).
    only_optimize: bool = False
    # Learning rate of the adapters (DS-Chat --*_lora_learning_rate), in (0, 1]; null: the
    # model's learning rate.
    learning_rate: float | None = None

    def __post_init__(self):
        _check(self.dim >= 0, "dim", self.dim, "must be >= 0 (0 disables LoRA)")
        _check_number("alpha", self.alpha, 0, low_open=True)
        if self.learning_rate is not None:
            _check_number("learning_rate", self.learning_rate, 0, 1, low_open=True,
                          note=", or null for the model's learning rate")
        if self.only_optimize and self.dim == 0:
            raise ConfigError("only_optimize: true needs dim > 0 (LoRA is disabled with dim 0)")


@dataclass(frozen=True)
class ServedRoleConfig:
    """A model served by `rlhf serve` instead of run in the trainer (NeMo-RLHF's
    rlhf.<role>.{ip,port}; docs/serving.md)."""

    # http://host:port of the server; null (and no ip/port): in the trainer's process.
    url: str | None = None
    # NeMo-RLHF's spelling: ip and port together make url http://ip:port.
    ip: str | None = None
    # NeMo-RLHF's spelling (its guide: 5555 reward model, 5556 initial policy, 5557 critic).
    port: int | None = None
    # Give up on one request after this many seconds of retries (backoff from 0.25 s, doubling
    # to 8 s); the error names the role, the URL and what the client last heard.
    timeout_s: float = 120.0
    # The model `rlhf launch` serves; null: the one the run would load in process.
    model: str | None = None

    def __post_init__(self):
        _check_served(self)


def _check_served(served: Any) -> None:
    """ServedRoleConfig's checks: ip and port together compose url, which must be http(s);
    timeout_s > 0."""
    if (served.ip is None) != (served.port is None):
        raise ConfigError(f"ip: {served.ip!r} and port: {served.port!r}: give both (NeMo's "
                          "spelling of url) or neither")
    if served.ip is not None:
        composed = f"http://{served.ip}:{served.port}"
        if served.url not in (None, composed):
            raise ConfigError(f"url: {served.url!r} and ip/port ({composed}) disagree; "
                              "give one of them")
        object.__setattr__(served, "url", composed)
    if served.url is not None:
        _check(served.url.startswith(("http://", "https://")), "url", served.url,
               "must start with http:// or https://")
    _check(served.timeout_s > 0, "timeout_s", served.timeout_s, "must be > 0")


@dataclass(frozen=True)
class ModuleConfig:
    """How one trained model (actor, critic, SFT or reward model) is run."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Recompute activations in the backward pass (DS-Chat --*_gradient_checkpointing;
    # remat in the JAX backend).
    gradient_checkpointing: bool = False
    # Set every dropout probability to 0 (DS-Chat --disable_*_dropout).
    disable_dropout: bool = True
    # Or override it with this value (DS-Chat --actor_dropout / --critic_dropout).
    dropout: float | None = None

    def __post_init__(self):
        if self.dropout is not None:
            _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class CriticConfig(ServedRoleConfig, ModuleConfig):
    """The PPO critic: how it is trained and, with url, the server that trains it.

    ModuleConfig's settings plus ServedRoleConfig's keys: with url, `rlhf serve critic`
    holds and trains the critic (NeMo-RLHF's rlhf.critic, port 5557 in its guide;
    docs/serving.md)."""

    def __post_init__(self):
        ModuleConfig.__post_init__(self)
        ServedRoleConfig.__post_init__(self)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a schedule from shared.schedules (identical in both backends)."""

    # Peak learning rate (after warmup), in (0, 1].
    learning_rate: float = 1e-5
    # Decoupled (AdamW) weight decay, in [0, 1].
    weight_decay: float = 0.0
    # constant | constant_with_warmup | linear | cosine (DS-Chat --lr_scheduler_type).
    lr_scheduler_type: Schedule = "cosine"
    # Linear warmup from 0 over this many optimiser steps.
    num_warmup_steps: int = 0
    # Floor of the cosine schedule, as a fraction of learning_rate.
    min_lr_ratio: float = 0.0
    # DeepSpeed-Chat uses betas (0.9, 0.95).
    betas: tuple[float, ...] = (0.9, 0.95)
    # Adam epsilon, in (0, 1].
    eps: float = 1e-8
    # Global gradient-norm clip, finite; 0 disables (DeepSpeed gradient_clipping).
    max_grad_norm: float = 1.0

    def __post_init__(self):
        _check_number("learning_rate", self.learning_rate, 0, 1, low_open=True)
        _check_number("weight_decay", self.weight_decay, 0, 1)
        _check(self.num_warmup_steps >= 0, "num_warmup_steps", self.num_warmup_steps,
               "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               self.betas, "must be two finite numbers in [0, 1)")
        _check_number("eps", self.eps, 0, 1, low_open=True)
        _check_number("max_grad_norm", self.max_grad_norm, 0, note=" (0 disables clipping)")
        _check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)


def _check_batches(prefix: str, **sizes: int) -> None:
    for name, value in sizes.items():
        _check(value >= 1, f"{prefix}{name}", value, "must be >= 1")


@dataclass(frozen=True)
class _StepConfig:
    """Fields common to the SFT and reward-model steps."""

    # Sequences (SFT) or comparison pairs (reward) per device per micro-step.
    per_device_train_batch_size: int = 16
    # Batch size per device for evaluation.
    per_device_eval_batch_size: int = 16
    # Passes over the training data (ignored when max_steps is set).
    num_train_epochs: int = 1
    # The number of optimiser steps, as in HF Trainer/TRL: overrides num_train_epochs, going
    # through the data as many times as it takes (each epoch in its own seeded order); null:
    # num_train_epochs passes.
    max_steps: int | None = None
    # Micro-batches accumulated per optimiser step; the loss is normalised by the global token
    # count, so this never changes the gradient.
    gradient_accumulation_steps: int = 1
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    model: ModuleConfig = field(default_factory=ModuleConfig)
    # Evaluate every N optimiser steps; 0: only at the end.
    eval_interval: int = 0

    def __post_init__(self):
        _check_batches("", per_device_train_batch_size=self.per_device_train_batch_size,
                       per_device_eval_batch_size=self.per_device_eval_batch_size,
                       num_train_epochs=self.num_train_epochs,
                       gradient_accumulation_steps=self.gradient_accumulation_steps)
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1 or null")
        _check(self.eval_interval >= 0, "eval_interval", self.eval_interval, "must be >= 0")


@dataclass(frozen=True)
class SFTConfig(_StepConfig):
    """Step 1: supervised fine-tuning on demonstrations."""

    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=1e-3))
    # How per-token losses become one number (shared.aggregation modes).
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = (
        "token-mean"
    )


@dataclass(frozen=True)
class RewardConfig(_StepConfig):
    """Step 2: reward-model training on comparisons."""

    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=5e-4))
    # bradley_terry: -log sigmoid(s_chosen - s_rejected - margin) on end scores;
    # dschat: DeepSpeed-Chat's token-span variant; kway: InstructGPT K-way ranking.
    loss: Literal["bradley_terry", "dschat", "kway"] = "bradley_terry"
    # Optional margin for bradley_terry (Llama-2 style); null: none.
    margin: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.margin is not None and self.loss != "bradley_terry":
            raise ConfigError(f"margin: only used with loss bradley_terry, not {self.loss!r}")
        if self.margin is not None:
            _check(math.isfinite(self.margin), "margin", self.margin,
                   "must be a finite number or null")


@dataclass(frozen=True)
class DPOConfig(_StepConfig):
    """Offline DPO on the reward step's comparisons (`rlhf dpo`; pipeline [sft, dpo]).

    The policy starts from the SFT model; its frozen starting weights are the reference."""

    # Comparison pairs (a chosen and a rejected sequence each) per device per micro-step.
    per_device_train_batch_size: int = 16
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=1e-6))
    # The KL strength beta: the implicit reward is beta * (log pi - log pi_ref) (TRL's 0.1).
    beta: float = 0.1
    # sigmoid: DPO's -log sigmoid(beta h) (cDPO with label_smoothing; Rafailov et al. 2023);
    # ipo: (h - 1 / (2 beta))^2 on length-averaged log-probs (Azar et al. 2023, as TRL).
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    # cDPO's assumed label-flip rate e, in [0, 0.5); sigmoid only (0: plain DPO).
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_number("beta", self.beta, 0, low_open=True)
        _check_number("label_smoothing", self.label_smoothing, 0, 0.5, high_open=True,
                      note=" (0: plain DPO)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError(f"label_smoothing: {self.label_smoothing!r} is invalid with "
                              "loss_type 'ipo'; allowed: 0 (label smoothing is cDPO's, for "
                              "loss_type 'sigmoid')")


@dataclass(frozen=True)
class SamplingConfig:
    """Rollout sampling (NeMo-RLHF model.sampling_params)."""

    # false: greedy decoding.
    do_sample: bool = True
    # Softmax temperature of sampling (the recorded log-probs are always at temperature 1).
    temperature: float = 1.0
    # 0 disables top-k filtering.
    top_k: int = 0
    # 1.0 disables nucleus filtering.
    top_p: float = 1.0

    def __post_init__(self):
        _check_number("temperature", self.temperature, 0, low_open=True)
        _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 disables)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")


@dataclass(frozen=True)
class PPOConfig:
    """Step 3: PPO with actor, reference, critic and reward models."""

    # Base conventions: default | deepspeed_chat | nemo | openrlhf | trl (PPO with a critic)
    # | grpo | dr_grpo | dapo | rloo | reinforce_plus_plus | gspo (critic-free;
    # shared.presets, docs/conventions.md).
    preset: str = "default"
    # The preset's conventions with the overrides given under `conventions:`
    # applied; the run snapshot stores every field, so it reloads identically.
    conventions: PPOConventions = field(default_factory=lambda: get_preset("default"))
    # Rollout rows (answers) per device per generation batch: that many prompts, or that
    # many / n_samples_per_prompt prompts answered n times each (DS-Chat
    # --per_device_generation_batch_size; NeMo rollout_micro_batch_size).
    per_device_generation_batch_size: int = 16
    # Mini-batch per device for each PPO update (DS-Chat --per_device_training_batch_size).
    per_device_training_batch_size: int = 16
    # Generation batches collected into the rollout buffer before training
    # (DS-Chat --generation_batches).
    generation_batches: int = 1
    # NeMo num_rollout_samples: total samples per rollout over all devices. When
    # set, generation_batches is derived from it at run time and must divide evenly.
    num_rollout_samples: int | None = None
    # Passes over the rollout buffer (DS-Chat --ppo_epochs; NeMo epochs).
    ppo_epochs: int = 1
    # Passes over the prompt dataset (DS-Chat --num_train_epochs; ignored when max_iterations
    # is set).
    num_train_epochs: int = 1
    # The number of PPO iterations (rollout + training), like the steps' max_steps: overrides
    # num_train_epochs, going through the prompts as many times as it takes; null:
    # num_train_epochs passes.
    max_iterations: int | None = None
    # Micro-batches accumulated per optimiser step; under the default
    # conventions.accumulation_scaling (global) this never changes the gradient.
    gradient_accumulation_steps: int = 1
    actor_optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(learning_rate=9.65e-6, lr_scheduler_type="cosine")
    )
    critic_optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(learning_rate=5e-6, lr_scheduler_type="cosine")
    )
    actor: ModuleConfig = field(default_factory=ModuleConfig)
    # The critic's training settings and, with url, its server (`rlhf serve critic`, NeMo's
    # rlhf.critic): values and optimiser steps then come from there.
    critic: CriticConfig = field(default_factory=CriticConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Pretraining (ptx) loss weight (DS-Chat --unsup_coef; InstructGPT's 27.8).
    unsup_coef: float = 27.8
    # joint: ptx loss added to the actor loss in the same optimiser step;
    # separate: DeepSpeed-Chat's extra optimiser step on the ptx batch.
    ptx_mode: Literal["joint", "separate"] = "joint"
    # Keep an exponential moving average of the actor (DS-Chat --enable_ema).
    enable_ema: bool = False
    # EMA decay: ema = beta * ema + (1 - beta) * actor (DeepSpeed-Chat's 0.992).
    ema_beta: float = 0.992
    # Keep the reference model in host memory (DS-Chat --offload_reference_model).
    offload_reference_model: bool = False
    # Weight dtype of the rollout sampler. null: the training dtype (exact; the parity-tested
    # default). bfloat16: the sampler runs on a bf16 copy of the actor cast once per
    # iteration (bf16 matmuls and KV cache, fp32 sampling and log-probs), streaming half
    # the bytes per decode step; the recorded log-probs then differ from the training
    # forward's (metric rollout_logprob_gap), which conventions.rollout_correction tis|mis
    # corrects (docs/performance.md). float32: fp32 rollouts even when training in bf16.
    rollout_dtype: Literal["float32", "bfloat16"] | None = None
    # With conventions.old_logprobs rollout: the largest |recorded - recomputed| log-prob
    # over the answer tokens a check may find before the run recomputes from then on (a
    # warning names both; fp32 rollouts on the training weights are ~1e-6 apart).
    old_logprobs_max_gap: float = 0.05
    # With conventions.old_logprobs rollout: the actor's forward still runs every this many
    # iterations (and at the first) to measure that gap (metric rollout_logprob_gap).
    old_logprobs_check_interval: int = 10
    # Answers with fewer tokens than this (EOS counted) are "too short". Rule:
    # mask: they stay in the batch with an all-zero response mask (no loss, no
    #   advantage), counted in metrics as `short_answers`;
    # dschat: dropped, and a batch with none left reuses the last valid rollout,
    #   as DeepSpeed-Chat does; also counted.
    min_answer_tokens: int = 2
    # What happens to too-short answers (see min_answer_tokens).
    short_answer_policy: Literal["mask", "dschat"] = "mask"
    # Print sampled prompts and answers every N iterations (DS-Chat --print_answers).
    print_answers: bool = False
    # Iterations between printed samples (DS-Chat --print_answers_interval).
    print_answers_interval: int = 1
    # Upcast logits to fp32 for the losses (DS-Chat --compute_fp32_loss).
    compute_fp32_loss: bool = False
    # fp16: skip both steps when either overflows (DS-Chat --align_overflow).
    align_overflow: bool = False
    # Answers sampled per prompt (the group of GRPO / RLOO; TRL num_generations, verl
    # rollout.n). A generation batch of per_device_generation_batch_size rows holds that
    # many / n prompts, each repeated n times: rows i*n .. i*n+n-1 answer prompt i, each
    # with its own sampling uniforms. Must divide per_device_generation_batch_size.
    n_samples_per_prompt: int = 1
    # A rule-based reward "module:function" (e.g. shared.data.demo:arithmetic_reward),
    # called as function(prompt, answer) -> float on the decoded prompt and answer text of
    # every rollout row; null: none.
    reward_function: str | None = None
    # reward = reward_model_weight * reward-model end score + reward_function_weight *
    # reward_function (when set). reward_model_weight 0 loads no reward model.
    reward_model_weight: float = 1.0
    # Weight of reward_function in the reward (see reward_model_weight).
    reward_function_weight: float = 1.0
    # The reward model served by `rlhf serve reward` (NeMo's rlhf.reward_model); no url:
    # in process.
    reward_model: ServedRoleConfig = field(default_factory=ServedRoleConfig)
    # The initial policy (reference) served by `rlhf serve initial-policy` (NeMo's
    # rlhf.initial_policy); no url: in process.
    initial_policy: ServedRoleConfig = field(default_factory=ServedRoleConfig)

    def __post_init__(self):
        _check_batches("", per_device_generation_batch_size=self.per_device_generation_batch_size,
                       per_device_training_batch_size=self.per_device_training_batch_size,
                       generation_batches=self.generation_batches, ppo_epochs=self.ppo_epochs,
                       num_train_epochs=self.num_train_epochs,
                       gradient_accumulation_steps=self.gradient_accumulation_steps,
                       print_answers_interval=self.print_answers_interval)
        if self.per_device_generation_batch_size % self.per_device_training_batch_size:
            raise ConfigError(
                "per_device_generation_batch_size: "
                f"{self.per_device_generation_batch_size} is not divisible by "
                f"per_device_training_batch_size={self.per_device_training_batch_size}; "
                "each generation batch is split into training mini-batches of that size"
            )
        if self.num_rollout_samples is not None:
            _check(self.num_rollout_samples >= 1, "num_rollout_samples",
                   self.num_rollout_samples, "must be >= 1 or null")
        if self.max_iterations is not None:
            _check(self.max_iterations >= 1, "max_iterations", self.max_iterations,
                   "must be >= 1 or null")
        _check_number("unsup_coef", self.unsup_coef, 0)
        _check_number("ema_beta", self.ema_beta, 0, 1, low_open=True, high_open=True)
        _check(self.min_answer_tokens >= 0, "min_answer_tokens", self.min_answer_tokens,
               "must be >= 0")
        _check(self.rollout_dtype in (None, "float32", "bfloat16"), "rollout_dtype",
               self.rollout_dtype, "must be null, float32 or bfloat16")
        _check_number("old_logprobs_max_gap", self.old_logprobs_max_gap, 0)
        _check(self.old_logprobs_check_interval >= 1, "old_logprobs_check_interval",
               self.old_logprobs_check_interval, "must be >= 1")
        self._check_critic_free()

    def _check_critic_free(self) -> None:
        """The group layout, the estimator's group needs and the reward mix."""
        n = self.n_samples_per_prompt
        _check(isinstance(n, int) and n >= 1, "n_samples_per_prompt", n, "must be >= 1")
        if self.per_device_generation_batch_size % n:
            raise ConfigError(
                f"n_samples_per_prompt: {n} does not divide per_device_generation_batch_size="
                f"{self.per_device_generation_batch_size}; a generation batch holds whole "
                "groups of n answers to one prompt")
        estimator = self.conventions.advantage_estimator
        if estimator in CRITIC_FREE_ESTIMATORS and self.critic.url is not None:
            raise ConfigError(f"critic.url: {self.critic.url!r} is invalid with "
                              f"conventions.advantage_estimator {estimator}: a critic-free "
                              "run has no critic to serve; remove critic.url (or ip/port)")
        if estimator == "rloo" and n < 2:
            raise ConfigError(f"n_samples_per_prompt: {n} is invalid with "
                              "conventions.advantage_estimator rloo; must be >= 2 (the "
                              "leave-one-out baseline needs another answer)")
        _check_number("reward_model_weight", self.reward_model_weight, 0)
        _check_number("reward_function_weight", self.reward_function_weight, 0)
        if self.reward_function is not None:
            module, _, function = self.reward_function.partition(":")
            _check(bool(module) and function.isidentifier()
                   and all(p.isidentifier() for p in module.split(".")), "reward_function",
                   self.reward_function, "must be 'module:function' (e.g. "
                   "shared.data.demo:arithmetic_reward) or null")
        elif self.reward_model_weight == 0:
            raise ConfigError("reward_model_weight: 0 is invalid without a reward_function; "
                              "the reward would be 0 for every answer")


@dataclass(frozen=True)
class TorchEngineConfig:
    """DeepSpeed settings (torch backend)."""

    # ZeRO stage of the SFT and reward-model steps (DS-Chat --zero_stage).
    zero_stage: Literal[0, 1, 2, 3] = 0
    # ZeRO stages of the PPO actor and critic (DS-Chat --actor_zero_stage, --critic_zero_stage).
    actor_zero_stage: Literal[0, 1, 2, 3] = 0
    # ZeRO stage of the PPO critic (DS-Chat --critic_zero_stage).
    critic_zero_stage: Literal[0, 1, 2, 3] = 0
    # Offload optimizer state (and parameters under ZeRO-3) to CPU (DS-Chat --offload).
    offload: bool = False
    # auto: the Hybrid Engine on CUDA where it builds, else generate through the
    # module with ZeRO-3 parameters gathered; on: Hybrid Engine or a loud error;
    # off: never (DS-Chat --enable_hybrid_engine).
    hybrid_engine: Literal["auto", "on", "off"] = "auto"
    # The decode loop of rollouts through the module (torch_rlhf.rollout_decode):
    # module: the model's forward with a growing DynamicCache (exact eager numerics);
    # static: a preallocated StaticCache, fixed shapes every step; packed: static with
    # every fp32 linear's weight packed once per rollout for oneDNN (CPU only; log-probs
    # differ from module by rounding, ~1e-6); compiled: static with torch.compile.
    rollout_decode: Literal["module", "static", "packed", "compiled"] = "module"
    # Hybrid Engine tensor-parallel size for generation (DS-Chat --inference_tp_size).
    inference_tp_size: int = 1
    # Free the generation KV cache after each rollout (DS-Chat --release_inference_cache).
    release_inference_cache: bool = False
    # Do not keep gathered actor parameters between generation steps
    # (DS-Chat --unpin_actor_parameters; DeepSpeed pin_parameters = not this).
    unpin_actor_parameters: bool = False
    # Layers gathered at a time by the Hybrid Engine (DS-Chat --tp_gather_partition_size).
    tp_gather_partition_size: int = 8
    # Keep LoRA weights in fp16/bf16 (DS-Chat --enable_mixed_precision_lora).
    enable_mixed_precision_lora: bool = False
    # torch.distributed backend; null: nccl on CUDA, gloo on CPU.
    dist_backend: str | None = None

    def __post_init__(self):
        _check(self.inference_tp_size >= 1, "inference_tp_size", self.inference_tp_size,
               "must be >= 1")
        _check(self.tp_gather_partition_size >= 1, "tp_gather_partition_size",
               self.tp_gather_partition_size, "must be >= 1")


@dataclass(frozen=True)
class MeshConfig:
    """Device-mesh axis sizes for the JAX backend; -1 takes the remaining devices."""

    # Data-parallel axis size (batch sharded, parameters replicated).
    data: int = -1
    # Fully-sharded axis size (batch and parameters sharded, ZeRO-3 style).
    fsdp: int = 1
    # Tensor-parallel axis size (matmul dimensions sharded).
    tensor: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            _check(size == -1 or size >= 1, name, size, "must be >= 1, or -1 for the rest")
        if sum(1 for s in sizes.values() if s == -1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")


@dataclass(frozen=True)
class JaxEngineConfig:
    """jax.jit / mesh settings (jax backend)."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Matmul/activation dtype; parameters and optimizer state stay float32.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # Write orbax checkpoints in a background thread.
    async_checkpointing: bool = True
    # Multi-host: coordinator "host:port"; null with SLURM variables present uses
    # them, otherwise runs single-process.
    coordinator_address: str | None = None
    # Number of JAX processes (hosts); null: from SLURM or 1.
    num_processes: int | None = None
    # This process's index; null: from SLURM or 0.
    process_id: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    torch: TorchEngineConfig = field(default_factory=TorchEngineConfig)
    jax: JaxEngineConfig = field(default_factory=JaxEngineConfig)


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics, TensorBoard, progress bars and checkpoints."""

    # Write TensorBoard events under <run>/tensorboard (DS-Chat --enable_tensorboard).
    enable_tensorboard: bool = True
    # Log metrics every N optimiser steps / PPO iterations.
    log_interval: int = 1
    # Write a resumable checkpoint every N steps; 0: only at the end of a step.
    save_interval: int = 0
    # Resumable checkpoints kept per step (older ones deleted).
    keep_checkpoints: int = 2
    # Show tqdm progress bars with ETA on the main process.
    progress_bar: bool = True
    # Metric lines per step on the console, spread evenly over its steps (0: none; `rlhf
    # --verbose`: every log_interval). All of them, every log_interval, are in <run>/run.log.
    console_lines: int = 4
    # TensorBoard directory; null: <run>/tensorboard (DS-Chat --tensorboard_path).
    tensorboard_path: str | None = None
    # Where metrics go besides metrics.jsonl (Hugging Face's report_to): a list of
    # tensorboard (also needs enable_tensorboard) and wandb (Weights & Biases: `pip install
    # wandb` first; WANDB_PROJECT, WANDB_MODE and the other WANDB_* variables apply), or
    # all, or none (docs/monitoring.md). The snapshot stores the list.
    report_to: (Literal["all", "none", "tensorboard", "wandb"]
                | tuple[Literal["tensorboard", "wandb"], ...]) = ("tensorboard",)
    # Draw PNG curves of each step into <run>/plots when it finishes (`rlhf plot` redraws).
    plots: bool = True

    def __post_init__(self):
        reports = {"all": ("tensorboard", "wandb"), "none": ()}.get(
            self.report_to, (self.report_to,) if isinstance(self.report_to, str)
            else self.report_to)
        object.__setattr__(self, "report_to", tuple(dict.fromkeys(reports)))
        _check(self.log_interval >= 1, "log_interval", self.log_interval, "must be >= 1")
        _check(self.save_interval >= 0, "save_interval", self.save_interval, "must be >= 0")
        _check(self.console_lines >= 0, "console_lines", self.console_lines, "must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints,
               "must be >= 1")


@dataclass(frozen=True)
class GuardConfig:
    """What a non-finite number in training does (every backend, every step)."""

    # A loss, gradient norm, reward score, value or log-prob that is NaN or infinite skips
    # the optimiser step (counted as skipped_steps, as DeepSpeed's fp16 overflow does; a PPO
    # rollout that holds one trains nothing); this many skips in a row stop the run, naming
    # the step, the quantity and the last good checkpoint. No final model is written with a
    # non-finite weight.
    max_consecutive_skips: int = 3

    def __post_init__(self):
        _check(self.max_consecutive_skips >= 1, "max_consecutive_skips",
               self.max_consecutive_skips, "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation run after each step (DS-Chat prompt_eval, the demo metric)."""

    # none, or arithmetic_accuracy: answers to held-out prompts checked exactly.
    metric: Literal["none", "arithmetic_accuracy"] = "none"
    # JSONL of {"prompt", "answer"}; null: the eval split of the prompt data.
    dataset: str | None = None
    # Evaluate on at most this many prompts (`rlhf eval` of a reward model: pairs).
    max_prompts: int = 256
    # Answers sampled per prompt for the metric (sampling params from ppo.sampling).
    samples_per_prompt: int = 1
    # Also report greedy-decoding accuracy.
    greedy: bool = True

    def __post_init__(self):
        _check(self.max_prompts >= 1, "max_prompts", self.max_prompts, "must be >= 1")
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", self.samples_per_prompt,
               "must be >= 1")


@dataclass(frozen=True)
class RLHFConfig:
    """The whole run: the three steps, both backends' engines, logging and eval."""

    # Seeds every RNG: model init, data order, sampling (DS-Chat --seed).
    seed: int = 1234
    # Run directory root; each run writes <output_dir>/<run_name>/. A plain relative path
    # (runs) is relative to the working directory rlhf runs in; ./x and ../x, as in every
    # path key, are relative to the config file that holds them.
    output_dir: str = "runs"
    # null: derived from the config file name and a timestamp.
    run_name: str | None = None
    # Which backend `rlhf` uses when --backend is not given.
    backend: Literal["torch", "jax"] = "torch"
    # Steps `rlhf pipeline` runs, in order: sft, reward, ppo (RLHF) or sft, dpo.
    pipeline_steps: tuple[Literal["sft", "reward", "ppo", "dpo"], ...] = ("sft", "reward", "ppo")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        actor_model_name_or_path="facebook/opt-1.3b",
        critic_model_name_or_path="facebook/opt-350m"))
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        if not self.pipeline_steps:
            raise ConfigError("pipeline_steps: must name at least one of sft, reward, ppo, "
                              "dpo")
        if len(set(self.pipeline_steps)) != len(self.pipeline_steps):
            raise ConfigError(f"pipeline_steps: {list(self.pipeline_steps)} is invalid; each "
                              "step may run once")
        tp = self.engine.torch
        if tp.hybrid_engine == "on" and tp.inference_tp_size > 1 and tp.actor_zero_stage != 3:
            raise ConfigError(
                f"engine.torch.inference_tp_size: {tp.inference_tp_size} needs "
                f"engine.torch.actor_zero_stage: 3 (got {tp.actor_zero_stage})"
            )

    def replace(self, **changes: Any) -> RLHFConfig:
        return dataclasses.replace(self, **changes)
