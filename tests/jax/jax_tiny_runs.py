"""Tiny end-to-end runs on the demo data: the config and a `RunContext` built without the CLI."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_LLAMA = dict(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=16, tie_word_embeddings=True, rms_norm_eps=1e-5,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY_RUN = {
    "base": str(REPO / "configs" / "demo.yaml"),
    "backend": "jax",
    "model": {"actor_config": TINY_LLAMA, "critic_config": TINY_LLAMA},
    "sft": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64, "max_steps": 3},
    "reward": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
               "max_steps": 3},
    "ppo": {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4,
            "max_iterations": 2, "ppo_epochs": 1, "unsup_coef": 0.5},
    "eval": {"max_prompts": 8, "samples_per_prompt": 1},
    "logging": {"progress_bar": False},
}
"""The demo shrunk to a 1-layer, 16-wide Llama and a few steps per stage."""


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def tiny_run(**sections) -> dict:
    """TINY_RUN deep-merged with `sections` (a config dict for a YAML file)."""
    return _merge(TINY_RUN, sections)


def make_context(config_path: Path, run_dir: Path, *overrides: str):
    """A `RunContext` for trainers built directly; reopens `run_dir` when it exists."""
    from jax_rlhf.sharding import make_mesh
    from jax_rlhf.train.common import RunContext, load_tokenizer
    from shared.config import load_config
    from shared.runlog import RunLogger, prepare_run_dir

    cfg = load_config(config_path, list(overrides))
    run_dir = prepare_run_dir(cfg, run_dir=run_dir, resume=(run_dir / "config.yaml").exists())
    return RunContext(cfg, run_dir, RunLogger(run_dir, enable_tensorboard=False),
                      make_mesh(cfg.engine.jax.mesh), load_tokenizer(cfg))
