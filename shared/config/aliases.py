"""Where each DeepSpeed-Chat argument and NeMo-RLHF ``rlhf.ppo`` key lives.

The tables map an outside name to one or more dotted keys of ``RLHFConfig``,
with an optional value transform. They are used three ways: as the reference
tables in ``docs/config.md``; by the command line, which accepts
``actor_zero_stage=3`` (or ``--actor_zero_stage 3``) as well as
``engine.torch.actor_zero_stage=3``; and in YAML, where NeMo's names are accepted
inside the ``ppo:`` section. DeepSpeed-Chat's step-1 and step-2 scripts share
names (``--model_name_or_path``, ``--learning_rate``, ``--zero_stage``) whose
home depends on the step, so ``DSCHAT_STEP_ARGS`` maps them per command
(``rlhf sft``, ``rlhf rm``) and is looked up before the step-3 table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "Alias",
    "DSCHAT_ARGS",
    "DSCHAT_STEP_ARGS",
    "NEMO_PPO_KEYS",
    "NOT_CONFIG",
    "alias_names",
    "resolve_alias",
]


class Alias(NamedTuple):
    targets: tuple[str, ...]
    transform: Callable[[Any], Any] | None = None
    note: str = ""


def _a(*targets: str, transform=None, note: str = "") -> Alias:
    return Alias(tuple(targets), transform, note)


def _hybrid(v: Any) -> Any:
    return {True: "on", False: "off"}.get(v, v)


def _not(v: Any) -> Any:
    return (not v) if isinstance(v, bool) else v


def _paths(v: Any) -> Any:
    items = v.split() if isinstance(v, str) else v
    return [{"path": p} if isinstance(p, str) else p for p in items]


# DeepSpeed-Chat training/step3_rlhf_finetuning/main.py arguments.
DSCHAT_ARGS: dict[str, Alias] = {
    "data_path": _a("data.datasets", transform=_paths),
    "data_split": _a("data.data_split"),
    "data_output_path": _a("data.cache_dir"),
    "unsupervised_dataset_name": _a("data.unsupervised_dataset_name"),
    "unsupervised_dataset_config_name": _a("data.unsupervised_dataset_config_name"),
    "unsup_coef": _a("ppo.unsup_coef"),
    "actor_model_name_or_path": _a("model.actor_model_name_or_path"),
    "critic_model_name_or_path": _a("model.critic_model_name_or_path"),
    "num_padding_at_beginning": _a("data.num_padding_at_beginning"),
    "per_device_generation_batch_size": _a("ppo.per_device_generation_batch_size"),
    "per_device_training_batch_size": _a("ppo.per_device_training_batch_size"),
    "generation_batches": _a("ppo.generation_batches"),
    "ppo_epochs": _a("ppo.ppo_epochs"),
    "max_prompt_seq_len": _a("data.max_prompt_seq_len"),
    "max_answer_seq_len": _a("data.max_answer_seq_len"),
    "actor_learning_rate": _a("ppo.actor_optim.learning_rate"),
    "critic_learning_rate": _a("ppo.critic_optim.learning_rate"),
    "actor_weight_decay": _a("ppo.actor_optim.weight_decay"),
    "critic_weight_decay": _a("ppo.critic_optim.weight_decay"),
    "num_train_epochs": _a("ppo.num_train_epochs"),
    "lr_scheduler_type": _a("ppo.actor_optim.lr_scheduler_type",
                            "ppo.critic_optim.lr_scheduler_type"),
    "gradient_accumulation_steps": _a("ppo.gradient_accumulation_steps"),
    "num_warmup_steps": _a("ppo.actor_optim.num_warmup_steps",
                           "ppo.critic_optim.num_warmup_steps"),
    "output_dir": _a("output_dir"),
    "seed": _a("seed"),
    "dtype": _a("model.dtype"),
    "offload": _a("engine.torch.offload"),
    "offload_reference_model": _a("ppo.offload_reference_model"),
    "actor_zero_stage": _a("engine.torch.actor_zero_stage"),
    "critic_zero_stage": _a("engine.torch.critic_zero_stage"),
    "actor_gradient_checkpointing": _a("ppo.actor.gradient_checkpointing"),
    "critic_gradient_checkpointing": _a("ppo.critic.gradient_checkpointing"),
    "actor_dropout": _a("ppo.actor.dropout"),
    "critic_dropout": _a("ppo.critic.dropout"),
    "disable_actor_dropout": _a("ppo.actor.disable_dropout"),
    "disable_critic_dropout": _a("ppo.critic.disable_dropout"),
    "enable_hybrid_engine": _a("engine.torch.hybrid_engine", transform=_hybrid,
                               note="true -> on, false -> off; auto is ours"),
    "unpin_actor_parameters": _a("engine.torch.unpin_actor_parameters"),
    "release_inference_cache": _a("engine.torch.release_inference_cache"),
    "inference_tp_size": _a("engine.torch.inference_tp_size"),
    "tp_gather_partition_size": _a("engine.torch.tp_gather_partition_size"),
    "actor_lora_dim": _a("ppo.actor.lora.dim"),
    "actor_lora_module_name": _a("ppo.actor.lora.module_name"),
    "critic_lora_dim": _a("ppo.critic.lora.dim"),
    "critic_lora_module_name": _a("ppo.critic.lora.module_name"),
    "only_optimize_lora": _a("ppo.actor.lora.only_optimize", "ppo.critic.lora.only_optimize"),
    "actor_lora_learning_rate": _a("ppo.actor.lora.learning_rate"),
    "critic_lora_learning_rate": _a("ppo.critic.lora.learning_rate"),
    "enable_ema": _a("ppo.enable_ema"),
    "enable_mixed_precision_lora": _a("engine.torch.enable_mixed_precision_lora"),
    "compute_fp32_loss": _a("ppo.compute_fp32_loss"),
    "enable_tensorboard": _a("logging.enable_tensorboard"),
    "tensorboard_path": _a("logging.tensorboard_path"),
    "end_of_conversation_token": _a("data.end_of_conversation_token"),
    "print_answers": _a("ppo.print_answers"),
    "print_answers_interval": _a("ppo.print_answers_interval"),
    "align_overflow": _a("ppo.align_overflow"),
    "test_stop_step": _a("ppo.max_iterations", note="DS-Chat's --enable_test_mode stop step"),
}


def _step_args(section: str, model_key: str) -> dict[str, Alias]:
    """DeepSpeed-Chat's step-1 / step-2 ``main.py`` arguments that differ from step 3's
    (``training/step{1,2}_*/main.py``), mapped into ``section`` (sft or reward)."""
    return {
        "model_name_or_path": _a(model_key),
        "per_device_train_batch_size": _a(f"{section}.per_device_train_batch_size"),
        "per_device_eval_batch_size": _a(f"{section}.per_device_eval_batch_size"),
        "max_seq_len": _a("data.max_seq_len"),
        "learning_rate": _a(f"{section}.optim.learning_rate"),
        "weight_decay": _a(f"{section}.optim.weight_decay"),
        "num_train_epochs": _a(f"{section}.num_train_epochs"),
        "gradient_accumulation_steps": _a(f"{section}.gradient_accumulation_steps"),
        "lr_scheduler_type": _a(f"{section}.optim.lr_scheduler_type"),
        "num_warmup_steps": _a(f"{section}.optim.num_warmup_steps"),
        "gradient_checkpointing": _a(f"{section}.model.gradient_checkpointing"),
        "dropout": _a(f"{section}.model.dropout"),
        "disable_dropout": _a(f"{section}.model.disable_dropout"),
        "zero_stage": _a("engine.torch.zero_stage"),
        "lora_dim": _a(f"{section}.model.lora.dim"),
        "lora_module_name": _a(f"{section}.model.lora.module_name"),
        "only_optimize_lora": _a(f"{section}.model.lora.only_optimize"),
        "lora_learning_rate": _a(f"{section}.model.lora.learning_rate"),
        "eval_interval": _a(f"{section}.eval_interval"),
    }


# Per `rlhf` command: step 1 is `rlhf sft`, step 2 `rlhf rm`. Names not here fall
# through to DSCHAT_ARGS (data_path, seed, dtype, offload, output_dir, ... mean the
# same in every step).
DSCHAT_STEP_ARGS: dict[str, dict[str, Alias]] = {
    "sft": _step_args("sft", "model.actor_model_name_or_path"),
    "rm": _step_args("reward", "model.critic_model_name_or_path"),
    # Not a DeepSpeed-Chat step: `rlhf dpo` reads the step-1 names into its own section.
    "dpo": _step_args("dpo", "model.actor_model_name_or_path"),
}

# DeepSpeed-Chat arguments that are not configuration here, and why. Given on the
# command line they are ignored with a warning.
NOT_CONFIG: dict[str, str] = {
    "local_rank": "set by the launcher (deepspeed / torchrun) through the environment; "
                  "`rlhf --local_rank=N` is accepted and ignored",
    "deepspeed": "DeepSpeed is the torch backend's engine; nothing to switch on",
    "print_loss": "losses are logged every logging.log_interval steps",
    "eval_iters": "the whole eval split is evaluated",
    "preprocessing_num_workers": "tokenisation is cached; one pass per dataset",
    "enable_test_mode": "use ppo.max_iterations",
    "add_eot_token": "the end-of-conversation token is always added to the tokenizer if missing",
}

def _abs_kl(v: Any) -> Any:
    return {True: "abs", False: "k1"}.get(v, v)


# NeMo-RLHF model.rlhf.ppo keys and model.sampling_params, plus the spellings of
# NeMo-Aligner's gpt_ppo_actor.yaml / gpt_ppo_critic.yaml.
NEMO_PPO_KEYS: dict[str, Alias] = {
    "entropy_penalty": _a("ppo.conventions.entropy_coef"),
    "entropy_bonus": _a("ppo.conventions.entropy_coef", note="NeMo-Aligner spelling"),
    "initial_policy_kl_penalty": _a("ppo.conventions.kl_coef"),
    # The spelling NeMo's own guide uses.
    "inital_pollicy_kl_penalty": _a("ppo.conventions.kl_coef"),
    "epochs": _a("ppo.ppo_epochs"),
    "num_rollout_samples": _a("ppo.num_rollout_samples"),
    "rollout_micro_batch_size": _a("ppo.per_device_generation_batch_size"),
    "ratio_eps": _a("ppo.conventions.clip_low"),
    "discount": _a("ppo.conventions.gamma"),
    "discount_factor": _a("ppo.conventions.gamma", note="NeMo-Aligner spelling"),
    "gae_lambda": _a("ppo.conventions.lam"),
    "normalize_advantage": _a("ppo.conventions.whiten_advantages"),
    "normalize_advantages": _a("ppo.conventions.whiten_advantages",
                               note="NeMo-Aligner spelling"),
    "use_absolute_kl": _a("ppo.conventions.kl_estimator", transform=_abs_kl,
                          note="true -> abs, false -> k1 (NeMo-Aligner)"),
    "loss_clip_val": _a("ppo.conventions.value_clip", note="NeMo-Aligner critic"),
    "use_greedy": _a("ppo.sampling.do_sample", transform=_not, note="negated"),
    "temperature": _a("ppo.sampling.temperature"),
    "top_k": _a("ppo.sampling.top_k"),
    "top_p": _a("ppo.sampling.top_p"),
    # The served roles (NeMo-RLHF's SLURM script: model.rlhf.<role>.{ip,port}).
    **{f"{prefix}rlhf.{role}.{part}": _a(f"ppo.{role}.{part}")
       for prefix in ("", "model.") for role in ("reward_model", "initial_policy", "critic")
       for part in ("ip", "port")},
}


def _lookup(key: str, command: str | None) -> Alias | None:
    return (DSCHAT_STEP_ARGS.get(command or "", {}).get(key) or DSCHAT_ARGS.get(key)
            or NEMO_PPO_KEYS.get(key))


def alias_names(command: str | None = None) -> list[str]:
    """Every outside name accepted for ``command`` (for did-you-mean suggestions)."""
    return sorted({*DSCHAT_STEP_ARGS.get(command or "", {}), *DSCHAT_ARGS, *NEMO_PPO_KEYS})


def resolve_alias(key: str, value: Any, *, command: str | None = None
                  ) -> list[tuple[str, Any]]:
    """Map ``key=value`` to ``[(dotted_key, value), ...]``; dotted keys pass through, a
    ``NOT_CONFIG`` name maps to nothing. ``command`` (sft, rm, ...) picks the step-1/2
    meaning of names DeepSpeed-Chat's steps share."""
    if key in NOT_CONFIG:
        return []
    alias = _lookup(key, command)
    if alias is None:
        return [(key, value)]
    if alias.transform is not None:
        value = alias.transform(value)
    return [(t, value) for t in alias.targets]
