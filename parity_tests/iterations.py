"""Level 6: whole training runs in both backends, driven through their public trainer APIs.

    dirs = build_level6_models(tmp)                    # SFT and reward-model HF directories
    config = level6_config(tmp, dirs, kl="adaptive")   # one config object for both backends
    result = run_level6(config, tmp)                   # per-step metrics, tokens, parameters
    rows = level6_rows(result)

Both backends start from the same two HF directories (a tiny Llama causal LM and its
`LlamaForSequenceClassification` reward model, saved with `save_pretrained` with the demo
tokenizer) and the same `RLHFConfig`:

- SFT: `torch_rlhf.sft.SFTTrainer.train_step` / `jax_rlhf.train.sft.SFTTrainer.train_step` on
  `trainer.iterator.next_batch()` (both iterators are `shared.data.BatchIterator` seeded alike);
- reward model: the `RewardTrainer`s the same way;
- PPO: `ppo_iterations` calls of `PPOTrainer.train_iteration` in both backends, which is the
  one loop of `shared.ppo_loop` (rollouts from `shared.sampling_uniforms`, scoring,
  `shared.compute_advantages` over the buffer, `ppo_epochs` x mini-batches, the KL
  controller and the EMA) around each backend's model protocol.

Compared: the per-step metrics, the sampled tokens of every generation batch (exactly), and
the final parameters of the SFT model, the reward model, the PPO actor, critic and EMA.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from parity_tests.harness import Row, build_checkpoint, compare, compare_grads, to_numpy
from parity_tests.optimiser import ensure_torch_distributed, split_key_biases, torch_state_dict

__all__ = ["KNOWN_DIFFERENT", "LEVEL6_LLAMA", "LR_METRICS", "TOKEN_WEIGHTED", "Level6Result",
           "build_level6_models", "known_different_rows", "level6_config", "level6_rows",
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

SFT_STEPS = REWARD_STEPS = 3

MIN_ANSWER_TOKENS = 4
"""Answers shorter than this (of at most `max_answer_seq_len` 4) are short: masked, and left out
of reward_score, kl and the KL controller's input."""

SFT_METRICS = ("loss", "lr", "grad_norm")
REWARD_METRICS = ("loss", "lr", "accuracy", "chosen_score", "rejected_score")
PPO_METRICS = ("actor_loss", "critic_loss", "pg_loss", "reward_score", "kl", "kl_coef",
               "rollout_logprob_gap", "advantages_mean", "returns_mean", "response_length",
               "clip_fraction", "approx_kl", "value_clip_fraction", "entropy", "actor_lr",
               "critic_lr", "ptx_loss", "short_answers")

TOKEN_WEIGHTED = ("clip_fraction", "approx_kl", "value_clip_fraction", "entropy")
"""PPO token statistics: in both backends each optimiser step's token-weighted value over its
micro-batches, then the plain mean over the iteration's steps (docs/architecture.md)."""

LR_METRICS = ("actor_lr", "critic_lr")
"""In both backends the learning rate of the iteration's last optimiser step (with ptx_mode
separate, the actor's last step is the ptx step)."""

KNOWN_DIFFERENT: tuple[str, ...] = ()
"""PPO metrics whose definitions still differ between the backends: none."""


def build_level6_models(tmp: str | Path) -> dict[str, Path]:
    """The SFT (causal LM) and reward-model (sequence classification) HF directories."""
    from transformers import AutoTokenizer

    tmp = Path(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    return {
        "sft": build_checkpoint(LEVEL6_LLAMA, tmp / "sft-model", kind="lm", seed=0,
                                tokenizer=tokenizer),
        "reward": build_checkpoint(LEVEL6_LLAMA, tmp / "reward-model", kind="value", seed=1,
                                   tokenizer=tokenizer),
    }


def level6_config(tmp: str | Path, dirs: dict[str, Path], *, kl: str = "adaptive",
                  lora: bool = False, ppo_iterations: int = 3, name: str = "level6.yaml",
                  ptx_mode: str = "joint", unsup_coef: float = 0.5,
                  min_answer_tokens: int = MIN_ANSWER_TOKENS):
    """The demo config on the level-6 models: small batches, binding schedules, decay and
    clipping, ppo_epochs 2 over 2 mini-batches of a 2-batch rollout buffer, EMA on, the demo
    ptx data (one ptx batch per actor step) and a short-answer threshold that masks some rows."""
    from shared.config import load_config

    optim = dict(learning_rate=5e-3, weight_decay=0.1, lr_scheduler_type="cosine",
                 num_warmup_steps=1, min_lr_ratio=0.1, max_grad_norm=1.0)
    module = {"lora": {"dim": 4, "alpha": 8.0, "module_name": "layers."}} if lora else {}
    data = {
        "base": str(DEMO),
        "output_dir": str(Path(tmp) / "runs"),
        "seed": 7,
        "model": {"actor_model_name_or_path": str(dirs["sft"]),
                  "critic_model_name_or_path": str(dirs["reward"]),
                  "tokenizer_name_or_path": str(DEMO_TOKENIZER),
                  "actor_config": None, "critic_config": None, "dtype": "fp32"},
        "data": {"cache_dir": str(Path(tmp) / "data-cache")},
        "logging": {"progress_bar": False, "enable_tensorboard": False},
        "sft": {"per_device_train_batch_size": 8, "max_steps": SFT_STEPS, "num_train_epochs": 1,
                "optim": optim, "model": module},
        "reward": {"per_device_train_batch_size": 8, "max_steps": REWARD_STEPS,
                   "num_train_epochs": 1, "optim": optim, "model": module},
        "ppo": {"per_device_generation_batch_size": 4, "generation_batches": 2,
                "per_device_training_batch_size": 4, "ppo_epochs": 2,
                "max_iterations": ppo_iterations, "num_train_epochs": 1,
                "enable_ema": True, "ema_beta": 0.9, "unsup_coef": unsup_coef,
                "ptx_mode": ptx_mode, "min_answer_tokens": min_answer_tokens,
                "actor_optim": {**optim, "learning_rate": 2e-3},
                "critic_optim": {**optim, "learning_rate": 5e-3},
                "conventions": {"kl_controller": kl, "kl_coef": 0.1, "kl_target": 0.05,
                                "kl_horizon": 20.0},
                "actor": module, "critic": module},
        "eval": {"metric": "none"},
        "engine": {"torch": {"zero_stage": 0, "actor_zero_stage": 0, "critic_zero_stage": 0,
                             "hybrid_engine": "off"}},
    }
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


@dataclasses.dataclass
class Level6Result:
    """One backend's run: metrics per step, tokens per generation batch, final parameters."""

    sft: list[dict[str, float]]
    reward: list[dict[str, float]]
    ppo: list[dict[str, float]]
    tokens: list[np.ndarray]  # [iteration * generation_batches] of [B, N]
    weights: dict[str, dict[str, np.ndarray]]  # sft, reward, actor, critic, ema


def _pick(metrics: dict, keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in keys if k in metrics}


def _ppo_iterations(ppo: Any) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """Every iteration of a PPOTrainer (either backend: the one loop of `shared.ppo_loop`)
    through `train_iteration`; the metrics and the sampled tokens of each generation batch."""
    tokens: list[np.ndarray] = []
    generate = ppo.generate_experience

    def recording(*args, **kwargs):
        experience = generate(*args, **kwargs)
        tokens.append(np.array(experience.response))
        return experience

    ppo.generate_experience = recording
    metrics = [_pick(ppo.train_iteration(), PPO_METRICS) for _ in range(ppo.total_iterations)]
    return metrics, tokens


def run_torch(config: Any, tmp: Path) -> Level6Result:
    import torch

    from torch_rlhf.ppo import PPOTrainer
    from torch_rlhf.reward import RewardTrainer
    from torch_rlhf.sft import SFTTrainer

    ensure_torch_distributed()
    out: dict[str, Any] = {"weights": {}}
    for step, cls, keys in (("sft", SFTTrainer, SFT_METRICS),
                            ("reward", RewardTrainer, REWARD_METRICS)):
        trainer = cls(config, run_dir=tmp / "torch")
        out[step] = [_pick(trainer.train_step(trainer.iterator.next_batch()), keys)
                     for _ in range(trainer.total_steps)]
        out["weights"][step] = torch_state_dict(trainer.engine)
    ppo = PPOTrainer(config, run_dir=tmp / "torch")
    out["ppo"], out["tokens"] = _ppo_iterations(ppo)
    out["weights"]["actor"] = torch_state_dict(ppo.engine.actor)
    out["weights"]["critic"] = torch_state_dict(ppo.engine.critic)
    with torch.no_grad():
        out["weights"]["ema"] = {k: to_numpy(v) for k, v in ppo.engine.ema_weights().items()}
    return Level6Result(**out)


def _jax_context(config: Any, run_dir: Path):
    from jax_rlhf.sharding import make_mesh
    from jax_rlhf.train.common import RunContext, load_tokenizer
    from shared.runlog import RunLogger, prepare_run_dir

    run_dir = prepare_run_dir(config, run_dir=run_dir)
    return RunContext(config, run_dir, RunLogger(run_dir, enable_tensorboard=False),
                      make_mesh(config.engine.jax.mesh), load_tokenizer(config))


def _jax_weights(mdef: Any, params: Any, frozen: Any) -> dict[str, np.ndarray]:
    from jax_rlhf.models import merge_lora, to_state_dict

    model = mdef.merge(params, frozen)
    model = merge_lora(model) if _has_lora(params) else model
    return {k: to_numpy(v) for k, v in to_state_dict(model).items()}


def _has_lora(params: Any) -> bool:
    from jax_rlhf.models import is_lora_param

    return any(is_lora_param(name) for name in params)


def run_jax(config: Any, tmp: Path) -> Level6Result:
    from jax_rlhf.train.ppo import PPOTrainer
    from jax_rlhf.train.reward import RewardTrainer
    from jax_rlhf.train.sft import SFTTrainer

    ctx = _jax_context(config, tmp / "jax")
    out: dict[str, Any] = {"weights": {}}
    for step, cls, keys in (("sft", SFTTrainer, SFT_METRICS),
                            ("reward", RewardTrainer, REWARD_METRICS)):
        trainer = cls(ctx)
        out[step] = [_pick(trainer.train_step(trainer.iterator.next_batch()), keys)
                     for _ in range(trainer.total_steps)]
        out["weights"][step] = _jax_weights(trainer.mdef, trainer.state.params,
                                            trainer.state.frozen)
    ppo = PPOTrainer(config, run_dir=ctx.run_dir, ctx=ctx)
    out["ppo"], out["tokens"] = _ppo_iterations(ppo)
    out["weights"]["actor"] = _jax_weights(ppo.actor_mdef, ppo.actor_state.params,
                                           ppo.actor_state.frozen)
    out["weights"]["critic"] = _jax_weights(ppo.critic_mdef, ppo.critic_state.params,
                                            ppo.critic_state.frozen)
    out["weights"]["ema"] = _jax_weights(ppo.actor_mdef, ppo.ema_params, ppo.actor_state.frozen)
    return Level6Result(**out)


def run_level6(config: Any, tmp: str | Path) -> tuple[Level6Result, Level6Result]:
    """(torch result, JAX result) of the same config."""
    for name in ("DeepSpeed", "torch_rlhf", "jax_rlhf"):
        logging.getLogger(name).setLevel(logging.WARNING)
    tmp = Path(tmp)
    return run_torch(config, tmp), run_jax(config, tmp)


def _metric_rows(label: str, t_steps, j_steps, tol: str,
                 keys: tuple[str, ...] | None = None) -> list[Row]:
    rows = []
    if len(t_steps) != len(j_steps):
        return [Row("6", f"{label} steps", float("inf"), float("inf"),
                    compare("6", "", 0, 0, tol).tolerance, False,
                    f"torch {len(t_steps)} steps, JAX {len(j_steps)}")]
    for key in keys or tuple(t_steps[0]):
        t = np.asarray([s[key] for s in t_steps])
        j = np.asarray([s.get(key, np.nan) for s in j_steps])
        rows.append(compare("6", f"{label} {key}", j, t, tol))
    return rows


def level6_rows(torch_result: Level6Result, jax_result: Level6Result, *,
                label: str = "") -> list[Row]:
    """Per-step metrics (each metric over all steps in one row), the sampled tokens, and the
    final parameters of every trained model."""
    t, j = torch_result, jax_result
    sfx = f" [{label}]" if label else ""
    rows = _metric_rows(f"sft{sfx}", t.sft, j.sft, "iteration_metrics")
    rows += _metric_rows(f"reward{sfx}", t.reward, j.reward, "iteration_metrics")
    same_count = len(t.tokens) == len(j.tokens)
    rows.append(compare("6", f"ppo tokens{sfx}", np.stack(j.tokens) if same_count else
                        np.zeros(0), np.stack(t.tokens), "exact", note=_first_token_diff(t, j)))
    aligned = tuple(k for k in PPO_METRICS if k not in KNOWN_DIFFERENT)
    rows += _metric_rows(f"ppo{sfx}", t.ppo, j.ppo, "iteration_metrics", aligned)
    for model in ("sft", "reward", "actor", "critic", "ema"):
        t_rest, t_noise = split_key_biases(t.weights[model])
        j_rest, j_noise = split_key_biases(j.weights[model])
        rows.append(compare_grads("6", f"{model} params{sfx}", j_rest, t_rest,
                                  "iteration_params"))
        if t_noise or j_noise:
            rows.append(compare_grads("6", f"{model} key biases{sfx}", j_noise, t_noise,
                                      "optimiser_zero_grad"))
    return rows


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
