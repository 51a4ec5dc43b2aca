"""Level 6: whole training runs in both backends, driven through their public trainer APIs.

    dirs = build_level6_models(tmp)                    # SFT and reward-model HF directories
    torch_result, jax_result = run_case("deepspeed_chat", dirs, tmp)   # one of LEVEL6_CASES
    rows = level6_rows(torch_result, jax_result, label="deepspeed_chat")

    config = level6_config(tmp, dirs, preset="nemo", ptx_mode="separate")  # any other settings
    config = level6_config(tmp, dirs, **level6_settings(user_config))     # a run config's PPO
    torch_result, jax_result = run_level6(config, tmp, steps=("ppo",))     #   choices

Both backends start from the same two HF directories (a tiny Llama causal LM that favours its
EOS, and its `LlamaForSequenceClassification` reward model, saved with `save_pretrained` with
the demo tokenizer) and the same `RLHFConfig`:

- SFT: `torch_rlhf.sft.SFTTrainer.train_step` / `jax_rlhf.train.sft.SFTTrainer.train_step` on
  `trainer.iterator.next_batch()` (both iterators are `shared.data.BatchIterator` seeded alike);
- reward model: the `RewardTrainer`s the same way;
- PPO: `ppo_iterations` calls of `PPOTrainer.train_iteration` in both backends, which is the
  one loop of `shared.ppo_loop` (rollouts from `shared.sampling_uniforms`, scoring,
  `shared.compute_advantages` over the buffer, `ppo_epochs` x mini-batches, the KL
  controller and the EMA) around each backend's model protocol. PPO starts from the two
  directories, not from the SFT / reward runs, so it can run alone (`steps`).

Compared: the per-step metrics, the sampled tokens and rollout masks of every generation batch
(exactly), the tensors each backend trained (exactly), and the final parameters of the SFT
model, the reward model, the PPO actor, critic and EMA (entries that torch itself cannot
reproduce under a rounding-level perturbation apart, `torch_sensitivity`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parity_tests.harness import Row, build_checkpoint, compare, compare_grads, to_numpy
from parity_tests.optimiser import ensure_torch_distributed, split_key_biases, torch_state_dict
from parity_tests.tolerances import tolerance

__all__ = ["KNOWN_DIFFERENT", "LEVEL6_CASES", "LEVEL6_LLAMA", "LR_METRICS", "TOKEN_WEIGHTED",
           "Level6Case", "Level6Result", "build_level6_models", "exercised",
           "known_different_rows", "level6_config", "level6_rows", "level6_settings", "run_case",
           "run_level6"]

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
DEMO_TOKENIZER = REPO / "configs" / "demo" / "tokenizer"

LEVEL6_LLAMA = dict(
    model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
    eos_token_id=2)
"""The demo tokenizer's vocabulary (32) in a 2-layer GQA Llama, 32 wide."""

SFT_STEPS = REWARD_STEPS = DPO_STEPS = 3
MODULES = ("sft", "reward", "actor", "critic")
LEVEL6_SEED = 7

MIN_ANSWER_TOKENS = 4
"""Answers shorter than this (of at most `max_answer_seq_len` 4) are short: masked, and left out
of reward_score, kl and the KL controller's input."""

SFT_METRICS = ("loss", "lr", "grad_norm")
REWARD_METRICS = ("loss", "lr", "accuracy", "chosen_score", "rejected_score")
DPO_METRICS = ("loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected",
               "rewards/accuracies", "rewards/margins")
PPO_METRICS = ("actor_loss", "critic_loss", "pg_loss", "reward_score", "kl", "kl_coef",
               "rollout_logprob_gap", "advantages_mean", "returns_mean", "response_length",
               "clip_fraction", "approx_kl", "value_clip_fraction", "entropy", "actor_lr",
               "critic_lr", "ptx_loss", "short_answers", "actor_grad_norm",
               "critic_grad_norm")
"""Compared per iteration; a metric that neither backend logs is left out (the pre-clip
gradient norms are new in `shared.ppo_loop`)."""

TOKEN_WEIGHTED = ("clip_fraction", "approx_kl", "value_clip_fraction", "entropy")
"""PPO token statistics: in both backends each optimiser step's token-weighted value over its
micro-batches, then the plain mean over the iteration's steps (docs/architecture.md)."""

LR_METRICS = ("actor_lr", "critic_lr")
"""In both backends the learning rate of the iteration's last optimiser step (with ptx_mode
separate, the actor's last step is the ptx step)."""

KNOWN_DIFFERENT: tuple[str, ...] = ()
"""PPO metrics whose definitions still differ between the backends: none."""


def build_level6_models(tmp: str | Path) -> dict[str, Path]:
    """The SFT (causal LM) and reward-model (sequence classification) HF directories; the SFT
    model ends answers early (`EOS_CHANNEL`)."""
    from transformers import AutoTokenizer

    tmp = Path(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    sft = build_checkpoint(LEVEL6_LLAMA, tmp / "sft-model", kind="lm", seed=0,
                           tokenizer=tokenizer)
    _favour_eos(sft, eos=tokenizer.eos_token_id)
    return {
        "sft": sft,
        "reward": build_checkpoint(LEVEL6_LLAMA, tmp / "reward-model", kind="value", seed=1,
                                   tokenizer=tokenizer),
    }


EOS_CHANNEL, EOS_WEIGHT = 2.0, 4.0
"""How the level-6 SFT model favours its EOS (`_favour_eos`). With its random weights (std
0.2) alone it samples the EOS about 1 time in 32 (the vocabulary), so almost every answer
would run to `max_answer_seq_len`: short answers, a trimmed answer width and a whole batch of
short answers (reused under DeepSpeed-Chat's policy) would never occur. With these values it
samples the EOS with probability ~0.35 at every position (measured over random contexts)."""


def _favour_eos(path: Path, *, eos: int, channel_value: float = EOS_CHANNEL,
                weight: float = EOS_WEIGHT) -> None:
    """Rewrite the Llama causal LM at `path` so that residual channel 0 is the constant
    `channel_value` (its embedding column; no attention or MLP output writes into it) and the
    LM head reads the EOS logit from it with `weight`: the EOS logit gains a positive amount
    at every position whatever the context. Every other weight is unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    channel = 0
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channel] = channel_value
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channel, :] = 0.0
            layer.mlp.down_proj.weight[channel, :] = 0.0
        model.lm_head.weight[eos, channel] = weight
    model.save_pretrained(str(path))


def level6_config(tmp: str | Path, dirs: dict[str, Path], *, kl: str | None = "adaptive",
                  preset: str = "default", conventions: dict[str, Any] | None = None,
                  lora: bool | tuple[str, ...] = False,
                  only_optimize: bool | tuple[str, ...] = False, ppo_iterations: int = 3,
                  generation_batches: int = 2,
                  name: str = "level6.yaml", ptx_mode: str = "joint", unsup_coef: float = 0.5,
                  min_answer_tokens: int = MIN_ANSWER_TOKENS, short_answer_policy: str = "mask",
                  gradient_accumulation_steps: int = 1, pad_with_eos: bool = False,
                  enable_ema: bool = True, ema_beta: float = 0.9,
                  sampling: dict[str, Any] | None = None, seed: int = LEVEL6_SEED,
                  ppo: dict[str, Any] | None = None):
    """The demo config on the level-6 models: small batches, binding schedules, decay and
    clipping, ppo_epochs 2 over 2 mini-batches of a 2-batch rollout buffer (4 mini-batches per
    iteration, `gradient_accumulation_steps` of them per optimiser step), EMA on, the demo ptx
    data (one ptx batch per actor step) and a short-answer threshold that masks some rows.

    Args:
      kl: "adaptive" or "fixed": the KL controller with coefficient 0.1, and for "adaptive" a
        target (0.05) and horizon (20) that move the coefficient every iteration; None keeps
        the preset's own controller and coefficient.
      preset: `ppo.preset`; `conventions`: `ppo.conventions` overrides of it (applied after
        the `kl` ones).
      lora: LoRA adapters (rank 4 on every `layers.` Linear) on every model (True) or on those
        named ("sft", "reward", "actor", "critic"); `only_optimize`: train only the adapters
        (`lora.only_optimize`) of every LoRA model (True) or of those named.
      generation_batches: rollout batches of 4 prompts per iteration (ppo_epochs 2 over
        mini-batches of 4: 2 x generation_batches mini-batches per iteration, which
        `gradient_accumulation_steps` must divide).
      pad_with_eos: `data.pad_with_eos` (the tokenizer pads with its EOS, as DeepSpeed-Chat
        does for OPT): with `conventions.mask_pad_tokens` every sampled EOS leaves the mask.
      seed: the run's seed (prompt order, sampling uniforms, LoRA adapters).
      ppo: further `ppo.*` keys (n_samples_per_prompt, reward_function and its weights).
      the rest: the `ppo.*` keys of the same names (`sampling`: `ppo.sampling`).
    """
    from shared.config import load_config

    optim = dict(learning_rate=5e-3, weight_decay=0.1, lr_scheduler_type="cosine",
                 num_warmup_steps=1, min_lr_ratio=0.1, max_grad_norm=1.0)
    lora, only_optimize = _modules("lora", lora), _modules("only_optimize", only_optimize)

    def module(kind: str) -> dict[str, Any]:
        if kind not in lora:
            return {}
        return {"lora": {"dim": 4, "alpha": 8.0, "module_name": "layers.",
                         "only_optimize": kind in only_optimize}}

    overrides: dict[str, Any] = ({"kl_controller": kl, "kl_coef": 0.1, "kl_target": 0.05,
                                  "kl_horizon": 20.0} if kl is not None else {})
    overrides.update(conventions or {})
    data = {
        "base": str(DEMO),
        "output_dir": str(Path(tmp) / "runs"),
        "seed": seed,
        "model": {"actor_model_name_or_path": str(dirs["sft"]),
                  "critic_model_name_or_path": str(dirs["reward"]),
                  "tokenizer_name_or_path": str(DEMO_TOKENIZER),
                  "actor_config": None, "critic_config": None, "dtype": "fp32"},
        "data": {"cache_dir": str(Path(tmp) / "data-cache"), "pad_with_eos": pad_with_eos},
        "logging": {"progress_bar": False, "enable_tensorboard": False},
        "sft": {"per_device_train_batch_size": 8, "max_steps": SFT_STEPS, "num_train_epochs": 1,
                "optim": optim, "model": module("sft")},
        "reward": {"per_device_train_batch_size": 8, "max_steps": REWARD_STEPS,
                   "num_train_epochs": 1, "optim": optim, "model": module("reward")},
        "dpo": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "max_steps": DPO_STEPS, "num_train_epochs": 1, "beta": 0.5, "optim": optim},
        "ppo": {"preset": preset,
                "per_device_generation_batch_size": 4, "generation_batches": generation_batches,
                "per_device_training_batch_size": 4, "ppo_epochs": 2,
                "gradient_accumulation_steps": gradient_accumulation_steps,
                "max_iterations": ppo_iterations, "num_train_epochs": 1,
                "enable_ema": enable_ema, "ema_beta": ema_beta, "unsup_coef": unsup_coef,
                "ptx_mode": ptx_mode, "min_answer_tokens": min_answer_tokens,
                "short_answer_policy": short_answer_policy,
                "actor_optim": {**optim, "learning_rate": 2e-3},
                "critic_optim": {**optim, "learning_rate": 5e-3},
                "conventions": overrides,
                "actor": module("actor"), "critic": module("critic")},
        "eval": {"metric": "none"},
        "engine": {"torch": {"zero_stage": 0, "actor_zero_stage": 0, "critic_zero_stage": 0,
                             "hybrid_engine": "off"}},
    }
    if sampling:
        data["ppo"]["sampling"] = dict(sampling)
    data["ppo"].update(ppo or {})
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def _modules(what: str, value: bool | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, bool):
        return MODULES if value else ()
    unknown = set(value) - set(MODULES)
    if unknown:
        raise ValueError(f"{what}: {sorted(unknown)} are not among {MODULES}")
    return tuple(value)


def level6_reward(prompt: str, answer: str) -> float:
    """The level-6 rule-based reward (`ppo.reward_function`): the demo's arithmetic checker
    plus 0.25 per answer character, so that the random level-6 models' answers differ."""
    from shared.data.demo import arithmetic_reward

    return arithmetic_reward(prompt, answer) + 0.25 * len(answer)


GROUPS = {"n_samples_per_prompt": 2}
"""Two answers per prompt: each generation batch of 4 rows holds 2 prompts."""
RULE_REWARD = {"reward_function": "parity_tests.iterations:level6_reward",
               "reward_model_weight": 0.0}


DSCHAT_SEED, DSCHAT_MIN_ANSWER_TOKENS = 39, 2
"""Seed and `min_answer_tokens` of the `deepspeed_chat` case: its 6 generation batches have one
whose answers all end before `max_answer_seq_len` with a row left valid (a trimmed width) and,
later, one whose answers are all short (reused), the first batch having valid rows (else
DeepSpeed-Chat's policy has nothing to reuse and stops). Picked by running seeds 0-130."""


def level6_settings(config: Any) -> dict[str, Any]:
    """`level6_config` keywords that carry a run config's PPO choices onto the built-in level-6
    run (`rlhf parity`): `ppo.preset` and every resolved `ppo.conventions` field,
    `short_answer_policy`, `ptx_mode`, `gradient_accumulation_steps`, `enable_ema` /
    `ema_beta`, `sampling`, `data.pad_with_eos`, and which models have LoRA and
    `only_optimize` (rank 4 on the tiny Llama whatever the config's rank and module names).

    Kept from level 6: the tiny models and the demo data, batch sizes and schedules, 3 steps
    / iterations, the ptx loss (on, with `unsup_coef` 0.5, so `ptx_mode` always acts), and
    `n_samples_per_prompt` (4 answers per prompt at most, a divisor of the 4 rows of a level-6
    generation batch), `reward_function` and the reward weights,
    the seed and `min_answer_tokens` (those of the `deepspeed_chat` case under the dschat
    policy, which must find a valid first batch; `MIN_ANSWER_TOKENS` and `LEVEL6_SEED`
    otherwise). A `gradient_accumulation_steps` that does not divide the 4 mini-batches of an
    iteration gets that many generation batches instead of 2."""
    from shared.config import to_dict

    ppo = config.ppo
    modules = {"sft": config.sft.model, "reward": config.reward.model, "actor": ppo.actor,
               "critic": ppo.critic}
    lora = tuple(k for k, m in modules.items() if m.lora.dim > 0)
    only = tuple(k for k in lora if modules[k].lora.only_optimize)
    accumulation = ppo.gradient_accumulation_steps
    dschat = ppo.short_answer_policy == "dschat"
    group = ppo.n_samples_per_prompt
    return {
        "kl": None, "preset": ppo.preset, "conventions": to_dict(ppo.conventions),
        "lora": lora, "only_optimize": only, "ptx_mode": ppo.ptx_mode,
        "short_answer_policy": ppo.short_answer_policy,
        "min_answer_tokens": DSCHAT_MIN_ANSWER_TOKENS if dschat else MIN_ANSWER_TOKENS,
        "seed": DSCHAT_SEED if dschat else LEVEL6_SEED,
        "gradient_accumulation_steps": accumulation,
        "generation_batches": 2 if 4 % accumulation == 0 else accumulation,
        "pad_with_eos": config.data.pad_with_eos, "enable_ema": ppo.enable_ema,
        "ema_beta": ppo.ema_beta, "sampling": to_dict(ppo.sampling),
        # the group (a divisor of level 6's 4 rows per generation batch) and the reward mix
        "ppo": {"n_samples_per_prompt": group if 4 % group == 0 else min(4, 2 * (group // 2)),
                "reward_function": ppo.reward_function,
                "reward_model_weight": ppo.reward_model_weight,
                "reward_function_weight": ppo.reward_function_weight},
    }


@dataclasses.dataclass(frozen=True)
class Level6Case:
    """One level-6 configuration: the `level6_config` keywords, the steps that run (the SFT
    and reward-model steps do not depend on the PPO settings, so only the cases that change
    their config run them) and whether only the slow suite runs it."""

    about: str
    settings: dict[str, Any]
    steps: tuple[str, ...] = ("ppo",)
    slow: bool = True
    expect: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What `exercised` must show in both backends: an int is a minimum count, a bool the
    value (the evidence that the case's settings acted)."""
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`dpo.*` keys replacing `level6_config`'s (beta 0.5, sigmoid, 4 pairs x 2 micro-batches
    per step, 3 steps)."""


LEVEL6_CASES: dict[str, Level6Case] = {
    "default": Level6Case(
        "preset default, adaptive KL controller, joint ptx, short answers masked",
        {"kl": "adaptive"}, steps=("sft", "reward", "ppo"), slow=False,
        expect={"short_rows": 1, "reused_batches": 0, "masked_pad_tokens": 0,
                "uneven_steps": 0, "minibatches_in_order": False}),
    "deepspeed_chat": Level6Case(
        "preset deepspeed_chat as DeepSpeed-Chat trains OPT: pad = EOS (data.pad_with_eos, so "
        "mask_pad_tokens masks every sampled EOS), gradient_accumulation_steps 2 "
        "(micro_batch_mean), unshuffled mini-batches, answers trimmed to the batch's longest, "
        "ptx_mode separate, short_answer_policy dschat with min_answer_tokens 2 (a batch of "
        "short answers reuses the last valid one)",
        {"kl": None, "preset": "deepspeed_chat", "gradient_accumulation_steps": 2,
         "pad_with_eos": True, "ptx_mode": "separate", "short_answer_policy": "dschat",
         "min_answer_tokens": DSCHAT_MIN_ANSWER_TOKENS, "seed": DSCHAT_SEED}, slow=False,
        expect={"short_rows": 1, "reused_batches": 1, "trimmed_batches": 1,
                "masked_pad_tokens": 1, "uneven_steps": 1, "minibatches_in_order": True}),
    "deepspeed_chat_pad_id": Level6Case(
        "preset deepspeed_chat with pad != EOS: mask_pad_tokens masks the pad tokens the "
        "policy samples inside answers; gradient_accumulation_steps 2, short answers masked, "
        "joint ptx",
        {"kl": None, "preset": "deepspeed_chat", "gradient_accumulation_steps": 2},
        expect={"trimmed_batches": 1, "masked_pad_tokens": 1, "uneven_steps": 1,
                "minibatches_in_order": True}),
    "nemo": Level6Case("preset nemo (abs KL estimator)", {"kl": None, "preset": "nemo"},
                       expect={"minibatches_in_order": False}),
    "openrlhf": Level6Case(
        "preset openrlhf, gradient_accumulation_steps 2 (global normalisers: equal within a "
        "step)",
        {"kl": None, "preset": "openrlhf", "gradient_accumulation_steps": 2},
        expect={"uneven_steps": 0, "minibatches_in_order": False}),
    "trl": Level6Case("preset trl (score one past the end, value_loss_scale 0.05)",
                      {"kl": None, "preset": "trl"}, expect={"minibatches_in_order": False}),
    "short_answers_dschat": Level6Case(
        "preset default, short_answer_policy dschat with min_answer_tokens 3 (seed 27, picked "
        "so that a batch of short answers reuses the previous iteration's last valid batch, "
        "scored again at the current weights)",
        {"kl": "adaptive", "short_answer_policy": "dschat", "min_answer_tokens": 3,
         "seed": 27}, expect={"reused_batches": 1}),
    "ptx_separate": Level6Case(
        "preset default, ptx_mode separate (an actor step on the ptx loss after each PPO step)",
        {"kl": "adaptive", "ptx_mode": "separate"}),
    "lora": Level6Case(
        "LoRA rank 4 on every model (base kernels frozen, the rest trains), fixed KL",
        {"kl": "fixed", "lora": True}, steps=("sft", "reward", "ppo")),
    "lora_only_optimize": Level6Case(
        "LoRA rank 4 with only_optimize on every model (SFT, reward model, actor, critic), "
        "fixed KL",
        {"kl": "fixed", "lora": True, "only_optimize": True}, steps=("sft", "reward", "ppo")),
    "grpo_rule_reward": Level6Case(
        "preset grpo (no critic: group-normalised advantages, k3 KL as a loss), 2 answers per "
        "prompt, a rule-based reward alone (`level6_reward`, no reward model)",
        {"kl": None, "preset": "grpo", "ppo": {**GROUPS, **RULE_REWARD}}, slow=False),
    "rloo": Level6Case("preset rloo (leave-one-out baseline, KL in the reward), 2 answers "
                       "per prompt, the reward model", {"kl": None, "preset": "rloo",
                                                        "ppo": GROUPS}),
    "reinforce_plus_plus": Level6Case(
        "preset reinforce_plus_plus (KL-penalised returns whitened over the buffer), the "
        "reward model mixed with the rule-based reward",
        {"kl": None, "preset": "reinforce_plus_plus",
         "ppo": {**RULE_REWARD, "reward_model_weight": 0.5}}),
    "gspo": Level6Case("preset gspo (sequence-ratio clip), 2 answers per prompt, the reward "
                       "model", {"kl": None, "preset": "gspo", "ppo": GROUPS}),
    "ppo_tis": Level6Case(
        "preset default with TIS: token weights min(rho, 2) of the training forward's "
        "log-probs against the sampler's reach both backends' steps (with the backends' own "
        "samplers rho is 1 within ~1e-6, so the weights are ~1; truncation and MIS on a real "
        "gap are tested in tests/shared/test_ppo_loop_critic_free.py)",
        {"kl": "adaptive", "conventions": {"rollout_correction": "tis"}}),
    "ppo_rollout_old_logprobs": Level6Case(
        "preset default with conventions.old_logprobs rollout: the sampler's log-probs are the "
        "PPO ratio's old ones and the actor's scoring forward runs only on the check "
        "iterations (ppo.old_logprobs_check_interval 2: iterations 0 and 2; fp32, so the gap "
        "stays ~1e-6 and no fallback happens)",
        {"kl": "adaptive", "conventions": {"old_logprobs": "rollout"},
         "ppo": {"old_logprobs_check_interval": 2}}),
    "lora_only_optimize_lm": Level6Case(
        "LoRA rank 4 with only_optimize on the causal LMs (SFT model, actor) only, LoRA without "
        "it on the value models, fixed KL",
        {"kl": "fixed", "lora": True, "only_optimize": ("sft", "actor")},
        steps=("sft", "ppo")),
    "dpo": Level6Case(
        "offline DPO from the SFT model (`rlhf dpo`): sigmoid loss with label smoothing 0.1 "
        "(cDPO), beta 0.5, reference log-probs from the starting policy, 2 micro-batches of 4 "
        "pairs per step", {"kl": None}, steps=("dpo",), slow=False,
        dpo={"label_smoothing": 0.1}),
    "dpo_ipo": Level6Case("offline IPO from the SFT model (length-averaged log-probs)",
                          {"kl": None}, steps=("dpo",), dpo={"loss_type": "ipo"}),
}
"""Every level-6 case (`run_case`); the default suite runs those with `slow=False`."""


def run_case(name: str, dirs: dict[str, Path], tmp: str | Path
             ) -> tuple[Level6Result, Level6Result]:
    """(torch result, JAX result) of `LEVEL6_CASES[name]` from the models `dirs`."""
    case = LEVEL6_CASES[name]
    tmp = Path(tmp) / name
    tmp.mkdir(parents=True, exist_ok=True)
    config = level6_config(tmp, dirs, name=f"{name}.yaml", **case.settings)
    if case.dpo:
        config = config.replace(dpo=dataclasses.replace(config.dpo, **case.dpo))
    return run_level6(config, tmp, steps=case.steps)


@dataclasses.dataclass
class Level6Result:
    """One backend's run: metrics per step, tokens per generation batch, final parameters.

    `sft` and `reward` are empty (and `weights` has no "sft" / "reward") when only PPO ran."""

    sft: list[dict[str, float]]
    reward: list[dict[str, float]]
    ppo: list[dict[str, float]]
    tokens: list[np.ndarray]  # [iteration * generation_batches] of [B, N]
    weights: dict[str, dict[str, np.ndarray]]  # sft, reward, actor, critic, ema
    dpo: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Per DPO optimiser step (`DPOTrainer.train_step` after the reference log-probs)."""
    rollouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per generation batch: generated_mask (the sampler's: up to and including the EOS),
    sample_mask and response_mask [B, N] (after mask_pad_tokens and the short-answer rule),
    is_short [B], answer_width, rows (a fingerprint per row), prompts (one of its prompt
    alone, to see the group layout), and reused (under the dschat
    policy, whether the batch was replaced by the last valid rollout)."""
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per PPO optimiser step: the loss normalisers of its micro-batches, and the row
    fingerprints of its micro-batches (which buffer rows it trained on, in order)."""
    config: Any = None
    """The run's `RLHFConfig`."""
    sensitivity: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    """torch only: per model and tensor, how far each final entry moves when the initial
    weights are perturbed at rounding level (`torch_sensitivity`)."""
    trained: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Per model (sft, reward, actor, critic): the HF tensors that training changed (LoRA
    merged, so an adapted kernel counts as changed): which parameters a backend trains."""
    seconds: float = 0.0
    """Wall time of this backend's run (trainer construction included)."""


def _copy(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Own copies (`harness.to_numpy` of a CPU torch tensor shares its memory, so the
    optimiser's in-place updates would show in a snapshot taken before training)."""
    return {name: np.array(value, copy=True) for name, value in weights.items()}


def _trained(initial: dict[str, dict[str, np.ndarray]],
             final: dict[str, dict[str, np.ndarray]]) -> dict[str, list[str]]:
    return {model: sorted(name for name, value in start.items()
                          if not np.array_equal(value, final[model][name]))
            for model, start in initial.items()}


def _pick(metrics: dict, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in keys if k in metrics}


def _fingerprint(prompt_ids: np.ndarray, response: np.ndarray) -> list[int]:
    """A per-row integer of a row's prompt and answer tokens (to follow rows through the
    mini-batch schedule)."""
    seq = np.concatenate([prompt_ids, response], axis=1).astype(np.int64)
    weights = np.arange(1, seq.shape[1] + 1, dtype=np.int64) * 1_000_003
    return [int(x) for x in (seq * weights).sum(1)]


def _ppo_iterations(ppo: Any) -> tuple[list[dict[str, float]], list[np.ndarray],
                                       list[dict[str, Any]], list[dict[str, Any]]]:
    """Every iteration of a PPOTrainer (either backend: the one loop of `shared.ppo_loop`)
    through `train_iteration`; the metrics, the sampled tokens of each generation batch, the
    rollout masks and the optimiser steps' normalisers and rows."""
    tokens: list[np.ndarray] = []
    rollouts: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    generate, sample, train_step = ppo.generate_experience, ppo.generate, ppo.train_step
    sampled: list[np.ndarray] = []
    sampled_masks: list[np.ndarray] = []

    def recording_generate(*args, **kwargs):
        out = sample(*args, **kwargs)
        sampled.append(np.array(out[0]))
        sampled_masks.append(np.array(out[1]))
        return out

    def recording(*args, **kwargs):
        experience = generate(*args, **kwargs)
        tokens.append(sampled[-1])
        rollouts.append({
            "generated_mask": np.array(sampled_masks[-1], np.float32),
            "rows": _fingerprint(experience.prompt_ids, experience.response),
            "prompts": _fingerprint(experience.prompt_ids, experience.response[:, :0]),
            "sample_mask": np.array(experience.sample_mask),
            "response_mask": np.array(experience.response_mask),
            "is_short": np.array(experience.is_short),
            "answer_width": int(experience.answer_width),
            "reused": not np.array_equal(np.asarray(experience.response), sampled[-1]),
        })
        return experience

    def recording_step(micro_batches, **kwargs):
        steps.append({
            "normalizers": list(kwargs["normalizers"]),
            "tokens": [float(m["response_mask"].sum()) for m in micro_batches],
            "rows": [_fingerprint(m["prompt_ids"], m["response"]) for m in micro_batches],
        })
        return train_step(micro_batches, **kwargs)

    ppo.generate_experience, ppo.generate, ppo.train_step = (recording, recording_generate,
                                                             recording_step)
    metrics = [_pick(ppo.train_iteration(), PPO_METRICS) for _ in range(ppo.total_iterations)]
    return metrics, tokens, rollouts, steps


STEPS = ("sft", "reward", "ppo", "dpo")


PERTURBATION = 1e-6
"""Relative size of the perturbation of a torch run's initial trainable weights in the
sensitivity runs (`torch_sensitivity`): the size of the backends' level-2/3 relative
differences (<= 3.6e-6 per gradient tensor), far below anything that changes a sampled token."""

SENSITIVITY_RUNS = 2
"""Perturbed torch runs per level-6 run (each ~1 s on the tiny models)."""


def _perturb_(modules: list[Any], seed: int) -> None:
    """Multiply every trainable parameter by (1 + PERTURBATION * N(0, 1)), in place."""
    import torch

    from torch_rlhf.models import unwrap_model

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for param in unwrap_model(module).parameters():
                if param.requires_grad:
                    noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                    param.mul_(1 + PERTURBATION * noise)


def run_torch(config: Any, tmp: Path, *, steps: tuple[str, ...] = STEPS,
              perturb: int | None = None) -> Level6Result:
    """The torch run; with `perturb` (a seed), the trainable weights of every trainer are
    perturbed by `PERTURBATION` right after it is built (`torch_sensitivity`)."""
    import torch

    from torch_rlhf.dpo import DPOTrainer
    from torch_rlhf.ppo import PPOTrainer
    from torch_rlhf.reward import RewardTrainer
    from torch_rlhf.sft import SFTTrainer

    ensure_torch_distributed()
    start = time.perf_counter()
    run_dir = tmp / ("torch" if perturb is None else f"torch-perturbed-{perturb}")
    out: dict[str, Any] = {"weights": {}, "sft": [], "reward": [], "ppo": [], "tokens": []}
    initial: dict[str, dict[str, np.ndarray]] = {}
    for step, cls, keys in (("sft", SFTTrainer, SFT_METRICS),
                            ("reward", RewardTrainer, REWARD_METRICS),
                            ("dpo", DPOTrainer, DPO_METRICS)):
        if step not in steps:
            continue
        trainer = cls(config, run_dir=run_dir)
        initial[step] = _copy(torch_state_dict(trainer.engine))
        if perturb is not None:
            _perturb_([trainer.engine], perturb)
        if step == "dpo":  # the reference: the starting policy's log-probs (DPOLoop.fit)
            trainer.loop.compute_reference(trainer)
        out[step] = [_pick(trainer.train_step(trainer.iterator.next_batch()), keys)
                     for _ in range(trainer.total_steps)]
        out["weights"][step] = torch_state_dict(trainer.engine)
    if "ppo" in steps:
        ppo = PPOTrainer(config, run_dir=run_dir)
        trained = {"actor": ppo.engine.actor, "critic": ppo.engine.critic}
        trained = {k: v for k, v in trained.items() if v is not None}  # critic-free: actor
        for model, engine in trained.items():
            initial[model] = _copy(torch_state_dict(engine))
        if perturb is not None:
            _perturb_(list(trained.values()), perturb)
        out["ppo"], out["tokens"], out["rollouts"], out["steps"] = _ppo_iterations(ppo)
        for model, engine in trained.items():
            out["weights"][model] = torch_state_dict(engine)
        if config.ppo.enable_ema:
            with torch.no_grad():
                out["weights"]["ema"] = {k: to_numpy(v)
                                         for k, v in ppo.engine.ema_weights().items()}
    return Level6Result(**out, config=config, trained=_trained(initial, out["weights"]),
                        seconds=time.perf_counter() - start)


def torch_sensitivity(config: Any, tmp: Path, reference: Level6Result, *,
                      steps: tuple[str, ...] = STEPS,
                      runs: int = SENSITIVITY_RUNS) -> dict[str, dict[str, np.ndarray]]:
    """Per model and HF tensor, the largest change of each final parameter entry over `runs`
    torch runs whose initial weights are perturbed by `PERTURBATION` (relative).

    Adam divides every gradient entry by its own running RMS: an entry whose gradient is
    near 0 at some step (a cancellation over tokens, like the key biases of level 4) moves
    by up to ~lr in a direction set by rounding noise. Such an entry cannot be reproduced to
    `iteration_params` even by torch itself, so `level6_rows` compares it apart. A run whose
    sampled tokens differ from the reference's (a near-tie) is not used."""
    sensitivity: dict[str, dict[str, np.ndarray]] = {}
    for seed in range(1, runs + 1):
        run = run_torch(config, tmp, steps=steps, perturb=seed)
        same_tokens = len(run.tokens) == len(reference.tokens) and all(
            np.array_equal(a, b) for a, b in zip(run.tokens, reference.tokens, strict=True))
        if not same_tokens:
            continue
        for model, weights in run.weights.items():
            into = sensitivity.setdefault(model, {})
            for name, value in weights.items():
                change = np.abs(np.asarray(value, np.float64)
                                - np.asarray(reference.weights[model][name], np.float64))
                into[name] = np.maximum(into.get(name, change), change)
    return sensitivity


def _jax_weights(mdef: Any, params: Any, frozen: Any) -> dict[str, np.ndarray]:
    from jax_rlhf.models import merge_lora, to_state_dict

    model = mdef.merge(params, frozen)
    model = merge_lora(model) if _has_lora(params, frozen) else model
    return {k: to_numpy(v) for k, v in to_state_dict(model).items()}


def _has_lora(*trees: Any) -> bool:
    from jax_rlhf.models import is_lora_param

    return any(is_lora_param(name) for tree in trees for name in tree)


def run_jax(config: Any, tmp: Path, *, steps: tuple[str, ...] = STEPS) -> Level6Result:
    from jax_rlhf.train.common import RunContext
    from jax_rlhf.train.dpo import DPOTrainer
    from jax_rlhf.train.ppo import PPOTrainer
    from jax_rlhf.train.reward import RewardTrainer
    from jax_rlhf.train.sft import SFTTrainer

    start = time.perf_counter()
    run_dir = tmp / "jax"
    ctx = RunContext.open(config, run_dir)
    out: dict[str, Any] = {"weights": {}, "sft": [], "reward": [], "ppo": [], "tokens": []}
    initial: dict[str, dict[str, np.ndarray]] = {}
    for step, cls, keys in (("sft", SFTTrainer, SFT_METRICS),
                            ("reward", RewardTrainer, REWARD_METRICS),
                            ("dpo", DPOTrainer, DPO_METRICS)):
        if step not in steps:
            continue
        trainer = cls(config, run_dir=run_dir, ctx=ctx)
        initial[step] = _jax_weights(trainer.mdef, trainer.state.params, trainer.state.frozen)
        if step == "dpo":
            trainer.loop.compute_reference(trainer)
        out[step] = [_pick(trainer.train_step(trainer.iterator.next_batch()), keys)
                     for _ in range(trainer.total_steps)]
        out["weights"][step] = _jax_weights(trainer.mdef, trainer.state.params,
                                            trainer.state.frozen)
    if "ppo" in steps:
        ppo = PPOTrainer(config, run_dir=run_dir, ctx=ctx)
        initial["actor"] = _jax_weights(ppo.actor_mdef, ppo.actor_state.params,
                                        ppo.actor_state.frozen)
        if ppo.critic_state is not None:
            initial["critic"] = _jax_weights(ppo.critic_mdef, ppo.critic_state.params,
                                             ppo.critic_state.frozen)
        out["ppo"], out["tokens"], out["rollouts"], out["steps"] = _ppo_iterations(ppo)
        out["weights"]["actor"] = _jax_weights(ppo.actor_mdef, ppo.actor_state.params,
                                               ppo.actor_state.frozen)
        if ppo.critic_state is not None:
            out["weights"]["critic"] = _jax_weights(ppo.critic_mdef, ppo.critic_state.params,
                                                    ppo.critic_state.frozen)
        if ppo.ema_params is not None:
            out["weights"]["ema"] = _jax_weights(ppo.actor_mdef, ppo.ema_params,
                                                 ppo.actor_state.frozen)
    return Level6Result(**out, config=config, trained=_trained(initial, out["weights"]),
                        seconds=time.perf_counter() - start)


def run_level6(config: Any, tmp: str | Path, *,
               steps: tuple[str, ...] = STEPS) -> tuple[Level6Result, Level6Result]:
    """(torch result, JAX result) of the same config; `steps`: which of sft, reward, ppo run
    (PPO starts from `model.*_name_or_path`, not from the SFT / reward runs, so it runs alone
    as well)."""
    for name in ("DeepSpeed", "torch_rlhf", "jax_rlhf"):
        logging.getLogger(name).setLevel(logging.WARNING)
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"level 6 steps {sorted(unknown)} do not exist; available: {STEPS}")
    tmp = Path(tmp)
    torch_result = run_torch(config, tmp, steps=steps)
    torch_result.sensitivity = torch_sensitivity(config, tmp, torch_result, steps=steps)
    return torch_result, run_jax(config, tmp, steps=steps)


def exercised(result: Level6Result) -> dict[str, Any]:
    """What one backend's PPO run exercised, from its recorded rollouts and optimiser steps
    (the evidence that a convention acted):

    - short_rows: too-short rows of freshly sampled batches;
    - reused_batches: batches replaced by the last valid rollout (short_answer_policy dschat);
    - trimmed_batches: fresh batches whose longest answer is shorter than max_answer_seq_len
      (what conventions.trim_answer_width cuts);
    - masked_pad_tokens: sampled tokens inside the sampler's mask that mask_pad_tokens took out;
    - uneven_steps: optimiser steps whose micro-batches have different loss normalisers
      (micro_batch_mean weights them apart; with global normalisers they are equal);
    - minibatches_in_order: every iteration's optimiser steps visit the rollout buffer in
      order, epoch after epoch (unshuffled mini-batches).
    """
    config = result.config
    fresh = [r for r in result.rollouts if not r["reused"]]
    iterations = max(len(result.ppo), 1)
    batches = len(result.rollouts) // iterations
    steps = len(result.steps) // iterations
    in_order = bool(result.steps)
    for i in range(iterations):
        buffer = [row for r in result.rollouts[i * batches:(i + 1) * batches]
                  for row in r["rows"]]
        visited = [row for step in result.steps[i * steps:(i + 1) * steps]
                   for micro in step["rows"] for row in micro]
        in_order &= visited == buffer * config.ppo.ppo_epochs
    width = config.data.max_answer_seq_len
    return {
        "short_rows": sum(int(r["is_short"].sum()) for r in fresh),
        "reused_batches": len(result.rollouts) - len(fresh),
        "trimmed_batches": sum(int(r["answer_width"] < width) for r in fresh),
        "masked_pad_tokens": int(sum((r["generated_mask"] - r["sample_mask"]).sum()
                                     for r in fresh)),
        "uneven_steps": sum(int(len(set(s["normalizers"])) > 1) for s in result.steps),
        "minibatches_in_order": in_order,
    }


def _metric_rows(label: str, t_steps, j_steps, tol: str,
                 keys: tuple[str, ...] | None = None) -> list[Row]:
    rows = []
    if len(t_steps) != len(j_steps):
        return [Row("6", f"{label} steps", float("inf"), float("inf"),
                    compare("6", "", 0, 0, tol).tolerance, False,
                    f"torch {len(t_steps)} steps, JAX {len(j_steps)}")]
    if not t_steps:
        return rows
    if keys is None:
        keys = tuple(t_steps[0])
    else:  # a metric neither backend logs (OPTIONAL_PPO_METRICS) is left out
        keys = tuple(k for k in keys if k in t_steps[0] or k in j_steps[0])
    for key in keys:
        t = np.asarray([s.get(key, np.nan) for s in t_steps])
        j = np.asarray([s.get(key, np.nan) for s in j_steps])
        rows.append(compare("6", f"{label} {key}", j, t, tol))
    return rows


def level6_rows(torch_result: Level6Result, jax_result: Level6Result, *,
                label: str = "") -> list[Row]:
    """Per-step metrics (each metric over all steps in one row), the sampled tokens and the
    rollout masks (exactly), and the final parameters of every trained model."""
    t, j = torch_result, jax_result
    sfx = f" [{label}]" if label else ""
    rows = _metric_rows(f"sft{sfx}", t.sft, j.sft, "iteration_metrics")
    rows += _metric_rows(f"reward{sfx}", t.reward, j.reward, "iteration_metrics")
    rows += _dpo_rows(t.dpo, j.dpo, sfx)
    if t.tokens or j.tokens:
        same_count = len(t.tokens) == len(j.tokens)
        rows.append(compare("6", f"ppo tokens{sfx}", np.stack(j.tokens) if same_count else
                            np.zeros(0), np.stack(t.tokens), "exact",
                            note=_first_token_diff(t, j)))
    if t.rollouts or j.rollouts:
        same_count = len(t.rollouts) == len(j.rollouts)
        masks = {side: np.stack([np.stack([r["sample_mask"], r["response_mask"]])
                                 for r in result.rollouts])
                 for side, result in (("torch", t), ("jax", j))}
        rows.append(compare("6", f"ppo masks{sfx}", masks["jax"] if same_count else
                            np.zeros(0), masks["torch"], "exact",
                            note="sample and response masks of every generation batch"))
    aligned = tuple(k for k in PPO_METRICS if k not in KNOWN_DIFFERENT)
    rows += _metric_rows(f"ppo{sfx}", t.ppo, j.ppo, "iteration_metrics", aligned)
    for model in ("sft", "reward", "dpo", "actor", "critic", "ema"):
        if model not in t.weights and model not in j.weights:
            continue
        if model in t.trained or model in j.trained:
            rows.append(_trained_row(f"{model} trained tensors{sfx}", t.trained.get(model, []),
                                     j.trained.get(model, [])))
        t_rest, t_noise = split_key_biases(t.weights.get(model, {}))
        j_rest, j_noise = split_key_biases(j.weights.get(model, {}))
        t_rest, j_rest, t_sensitive, j_sensitive = _split_sensitive(
            t_rest, j_rest, t.sensitivity.get(model, {}))
        rows.append(compare_grads("6", f"{model} params{sfx}", j_rest, t_rest,
                                  "iteration_params"))
        if t_sensitive:
            row = compare_grads("6", f"{model} rounding-sensitive entries{sfx}", j_sensitive,
                                t_sensitive, "iteration_params_sensitive")
            count = sum(v.size for v in t_sensitive.values())
            rows.append(dataclasses.replace(row, note=f"{count} entries; {row.note}"))
        if t_noise or j_noise:
            rows.append(compare_grads("6", f"{model} key biases{sfx}", j_noise, t_noise,
                                      "optimiser_zero_grad"))
    return rows


def _dpo_rows(t_steps: list[dict[str, float]], j_steps: list[dict[str, float]],
              sfx: str) -> list[Row]:
    """The DPO metrics per step; `rewards/accuracies` (the share of pairs whose chosen reward
    is strictly larger) only from the first step whose policy has moved: before that the
    policy is its reference, every implicit reward is 0 up to rounding and rounding breaks
    the ties (exact zeros in torch, +-1e-8 in JAX)."""
    keys = tuple(k for k in DPO_METRICS if k != "rewards/accuracies")
    rows = _metric_rows(f"dpo{sfx}", t_steps, j_steps, "iteration_metrics", keys)
    moved = [i for i in range(len(t_steps)) if any(s["lr"] > 0 for s in t_steps[:i])]
    if moved and len(t_steps) == len(j_steps):
        row = compare("6", f"dpo{sfx} rewards/accuracies",
                      np.asarray([j_steps[i]["rewards/accuracies"] for i in moved]),
                      np.asarray([t_steps[i]["rewards/accuracies"] for i in moved]),
                      "iteration_metrics")
        rows.append(dataclasses.replace(row, note=f"steps {[i + 1 for i in moved]} (the "
                                        "policy moved)"))
    return rows


def _split_sensitive(torch_weights: dict[str, np.ndarray], jax_weights: dict[str, np.ndarray],
                     sensitivity: dict[str, np.ndarray]):
    """(torch, JAX without the rounding-sensitive entries, torch, JAX of those entries only).

    An entry is rounding-sensitive when torch's own sensitivity runs move it by more than
    `iteration_params` allows its tensor; it is left out of (zeroed in) the params row and
    compared in a row of its own (`iteration_params_sensitive`)."""
    tol = tolerance("iteration_params")
    rest_t, rest_j, sens_t, sens_j = dict(torch_weights), dict(jax_weights), {}, {}
    for name, ref in torch_weights.items():
        change = sensitivity.get(name)
        if change is None or name not in jax_weights or jax_weights[name].shape != ref.shape:
            continue
        sensitive = change > tol.atol + tol.rtol * float(np.abs(ref).max(initial=0.0))
        if sensitive.any():
            rest_t[name] = np.where(sensitive, 0.0, ref)
            rest_j[name] = np.where(sensitive, 0.0, jax_weights[name])
            sens_t[name], sens_j[name] = ref[sensitive], jax_weights[name][sensitive]
    return rest_t, rest_j, sens_t, sens_j


def _trained_row(quantity: str, torch_names: list[str], jax_names: list[str]) -> Row:
    """Exact: the same HF tensors changed by training in both backends (a parameter one
    backend trains and the other freezes shows up here by name, before its drift spreads)."""
    names = sorted(set(torch_names) | set(jax_names))
    t = np.asarray([n in torch_names for n in names])
    j = np.asarray([n in jax_names for n in names])
    only_torch = [n for n in names if n in torch_names and n not in jax_names]
    only_jax = [n for n in names if n in jax_names and n not in torch_names]
    note = f"{len(torch_names)} tensors trained"
    if only_torch or only_jax:
        note = f"trained only by torch: {only_torch[:4]}, only by JAX: {only_jax[:4]}"
    return compare("6", quantity, j, t, "exact", note=note)


def known_different_rows(torch_result: Level6Result, jax_result: Level6Result, *,
                         keys: tuple[str, ...] = KNOWN_DIFFERENT, label: str = "") -> list[Row]:
    """Rows of the PPO metrics `keys` alone (by default `KNOWN_DIFFERENT`, now empty), held to
    the `iteration_metrics` tolerance."""
    sfx = f" [{label}]" if label else ""
    return _metric_rows(f"ppo{sfx}", torch_result.ppo, jax_result.ppo, "iteration_metrics",
                        keys)


def _first_token_diff(t: Level6Result, j: Level6Result) -> str:
    for index, (a, b) in enumerate(zip(t.tokens, j.tokens, strict=False)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"generation batch {index}: shapes {a.shape} / {b.shape}"
        where = np.argwhere(a != b)
        if where.size:
            row, col = where[0]
            return (f"first difference: generation batch {index} row {row} token {col} "
                    f"(torch {a[row, col]}, JAX {b[row, col]})")
    return ""
