"""A critic-free run on DeepSpeed through the public trainer: GRPO with the arithmetic checker
as the only reward builds no critic and no reward model, checkpoints and resumes without
them, and exports no ``ppo/critic`` (configs/demo-grpo.yaml, shrunk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_config
from torch_rlhf.ppo import PPOTrainer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


def _grpo_config(tmp_path, data_cache):
    return load_config(REPO / "configs" / "demo-grpo.yaml", [
        f"data.cache_dir={data_cache}", f"output_dir={tmp_path}",
        "ppo.per_device_generation_batch_size=8", "ppo.n_samples_per_prompt=4",
        "ppo.per_device_training_batch_size=4", "ppo.max_iterations=2",
        "logging.progress_bar=false", "logging.enable_tensorboard=false",
        "logging.plots=false", "eval.metric=none"])


def test_grpo_builds_no_critic_and_resumes(tmp_path, distributed, data_cache):
    config = _grpo_config(tmp_path, data_cache)
    run_dir = tmp_path / "run"
    first = PPOTrainer(config, run_dir=run_dir)
    assert first.models == ("actor", "reference", "reward_fn")
    assert first.engine.critic is None and first.engine.reward is None
    assert set(first.engine.modules) == {"actor", "ref"}
    metrics = first.train_iteration()
    assert metrics["critic_loss"] == 0.0 and metrics["critic_lr"] == 0.0
    first.save()
    assert not (first.checkpoints.latest() / "critic").exists()

    second = PPOTrainer(config, run_dir=run_dir)
    assert second.resume() and second.iteration == 1  # from the critic-free checkpoint
    entry = second.run()
    assert second.iteration == 2
    assert entry["models"] == ["actor", "reference", "reward_fn"]
    assert "critic_model" not in entry
    assert (run_dir / "ppo" / "final").is_dir() and not (run_dir / "ppo" / "critic").exists()
