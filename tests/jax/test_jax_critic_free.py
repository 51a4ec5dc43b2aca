"""A critic-free run in JAX through the public trainer: GRPO with the arithmetic checker as the
only reward builds no critic and no reward model (nor their parameters or optimiser),
checkpoints and resumes without them, and exports no ``ppo/critic`` (configs/demo-grpo.yaml,
shrunk)."""

from __future__ import annotations

from pathlib import Path

from jax_tiny_runs import make_context

from jax_rlhf.train.ppo import PPOTrainer

REPO = Path(__file__).resolve().parents[2]


def test_grpo_builds_no_critic_and_resumes(tmp_path):
    overrides = (f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path}",
                 "ppo.per_device_generation_batch_size=8", "ppo.n_samples_per_prompt=4",
                 "ppo.per_device_training_batch_size=4", "ppo.max_iterations=2",
                 "logging.progress_bar=false", "logging.enable_tensorboard=false",
                 "logging.plots=false", "eval.metric=none",
                 "engine.jax.async_checkpointing=false")
    config_path = REPO / "configs" / "demo-grpo.yaml"
    run_dir = tmp_path / "run"
    ctx = make_context(config_path, run_dir, *overrides)
    first = PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)
    assert first.models == ("actor", "reference", "reward_fn")
    assert first.critic_state is None and first.critic_mdef is None
    assert first.reward_params is None and first.spec.critic is None
    metrics = first.train_iteration()
    assert metrics["critic_loss"] == 0.0 and metrics["critic_lr"] == 0.0
    first.save()

    ctx = make_context(config_path, run_dir, *overrides)
    second = PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)
    assert second.resume() and second.iteration == 1  # from the critic-free checkpoint
    entry = second.run()
    assert second.iteration == 2
    assert entry["models"] == ["actor", "reference", "reward_fn"]
    assert "critic_model" not in entry
    assert (run_dir / "ppo" / "final").is_dir() and not (run_dir / "ppo" / "critic").exists()
