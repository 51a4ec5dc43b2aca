"""What every workload is built from: shapes, run configs and synthetic batches.

The trainers are built from a real ``RLHFConfig`` (the demo config as ``base:``, so their data
pipeline, tokenizer and optimisers are the framework's own), but the batches timed are
synthetic: random token ids of the model's vocabulary at exactly the benchmark's shapes, every
position real (no padding), answers always ``answer_len`` long.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["Shapes", "prompt_batch", "sft_batch", "write_run_config"]

_REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = _REPO / "configs" / "demo.yaml"
FIRST_ORDINARY_TOKEN = 3  # after pad / bos / eos


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one benchmark run (the same for every backend)."""

    prompt_len: int = 64
    """P: prompt tokens (every one real)."""
    answer_len: int = 64
    """N: generated tokens, always all of them (no EOS stop)."""
    generation_batches: tuple[int, ...] = (1, 16)
    """Rows of the generation benchmarks."""
    sft_batch: int = 8
    """Rows of one SFT step (sequence length P + N)."""
    ppo_rollout_batch: int = 16
    """Rows generated and scored per PPO iteration."""
    ppo_minibatch: int = 8
    """Rows of one PPO actor + critic optimiser step (so ppo_rollout_batch / ppo_minibatch
    steps per iteration, one PPO epoch)."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.answer_len

    @property
    def ppo_steps(self) -> int:
        return self.ppo_rollout_batch // self.ppo_minibatch


def write_run_config(directory: Path, model: dict[str, Any], shapes: Shapes, *,
                     lm_dir: str | None = None, value_dir: str | None = None, seed: int = 1234,
                     extra: dict[str, Any] | None = None) -> tuple[Path, Any]:
    """``directory/config.yaml``: the demo config with the benchmark's model and shapes.

    ``model``: HF config kwargs (``bench.models.SIZES[size]``), the actor's and critic's.
    ``lm_dir`` / ``value_dir`` become the actor and critic checkpoints; ``extra`` is
    deep-merged last. Returns the path and the loaded ``RLHFConfig``.
    """
    from shared.config import load_config

    data: dict[str, Any] = {
        "base": str(DEMO_CONFIG),
        "seed": seed,
        "output_dir": str(directory / "runs"),
        "model": {"actor_config": dict(model), "critic_config": dict(model), "dtype": "fp32",
                  "actor_model_name_or_path": lm_dir, "critic_model_name_or_path": value_dir},
        "data": {"max_seq_len": shapes.seq_len, "max_prompt_seq_len": shapes.prompt_len,
                 "max_answer_seq_len": shapes.answer_len},
        "sft": {"per_device_train_batch_size": shapes.sft_batch,
                "gradient_accumulation_steps": 1, "num_train_epochs": 1, "eval_interval": 0},
        "ppo": {"per_device_generation_batch_size": shapes.ppo_rollout_batch,
                "per_device_training_batch_size": shapes.ppo_minibatch,
                "generation_batches": 1, "ppo_epochs": 1, "gradient_accumulation_steps": 1,
                "num_train_epochs": 1, "unsup_coef": 0.0, "enable_ema": False,
                "print_answers": False},
        "logging": {"progress_bar": False, "enable_tensorboard": False},
        "engine": {"torch": {"zero_stage": 0, "actor_zero_stage": 0, "critic_zero_stage": 0,
                             "hybrid_engine": "auto"}},
    }
    if extra:
        data = _merge(data, extra)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, load_config(path)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def _tokens(rows: int, length: int, vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_ORDINARY_TOKEN, vocab_size, size=(rows, length)).astype(np.int32)


def prompt_batch(rows: int, shapes: Shapes, vocab_size: int, *, seed: int = 0):
    """A ``shared.data.PromptBatch`` of ``rows`` full-length random prompts."""
    from shared.data import PromptBatch

    ids = _tokens(rows, shapes.prompt_len, vocab_size, seed)
    return PromptBatch(prompt_input_ids=ids, prompt_attention_mask=np.ones_like(ids))


def sft_batch(rows: int, shapes: Shapes, vocab_size: int, *, seed: int = 0):
    """A ``shared.data.SFTBatch`` of ``rows`` random prompt + answer sequences; the loss is on
    the answer tokens, as DeepSpeed-Chat's step 1 trains by default."""
    from shared.data import SFTBatch

    ids = _tokens(rows, shapes.seq_len, vocab_size, seed)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, shapes.prompt_len:] = 1
    return SFTBatch(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=loss_mask)
