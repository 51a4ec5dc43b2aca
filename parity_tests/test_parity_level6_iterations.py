"""Level 6: whole runs through each backend's public trainers from the same SFT and reward-model
HF directories and the same config: 3 SFT steps, 3 reward-model steps, 3 PPO iterations
(2 generation batches, ppo_epochs 2 over 2 mini-batches, EMA, joint ptx, short answers
masked), with the adaptive KL controller; the LoRA variant (fixed controller) is slow.
Compared: per-step metrics, sampled tokens (exactly) and final parameters of every trained
model."""

from __future__ import annotations

import pytest

from parity_tests.harness import assert_passed
from parity_tests.iterations import (
    LR_METRICS,
    TOKEN_WEIGHTED,
    build_level6_models,
    known_different_rows,
    level6_config,
    level6_rows,
    run_level6,
)


@pytest.fixture(scope="module")
def level6_dirs(tmp_path_factory):
    return build_level6_models(tmp_path_factory.mktemp("level6-models"))


@pytest.fixture(scope="module")
def adaptive_run(level6_dirs, tmp_path_factory):
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        tmp = tmp_path_factory.mktemp("level6-adaptive")
        return run_level6(level6_config(tmp, level6_dirs, kl="adaptive"), tmp)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_whole_runs_agree(adaptive_run):
    torch_result, jax_result = adaptive_run
    assert_passed(level6_rows(torch_result, jax_result, label="adaptive kl"))
    kl_coefs = [m["kl_coef"] for m in torch_result.ppo]
    assert len(set(kl_coefs)) == len(kl_coefs)  # the adaptive controller moved every time
    assert len(torch_result.tokens) == 6  # 3 iterations x 2 generation batches


def test_token_weighted_ppo_statistics(adaptive_run):
    """Both backends: the mean over optimiser steps of each step's token-weighted value."""
    assert_passed(known_different_rows(*adaptive_run, keys=TOKEN_WEIGHTED))


def test_learning_rate_metrics(adaptive_run):
    """Both backends: the learning rate of the iteration's last optimiser step."""
    assert_passed(known_different_rows(*adaptive_run, keys=LR_METRICS))


def test_short_answers_and_ptx_are_exercised(adaptive_run):
    torch_result, jax_result = adaptive_run
    shorts = [m["short_answers"] for m in torch_result.ppo]
    assert shorts == [m["short_answers"] for m in jax_result.ppo]
    assert any(shorts) and all(s < 8 for s in shorts)  # some masked, some valid rows left
    assert all(m["ptx_loss"] > 0 for m in torch_result.ppo)


@pytest.mark.slow
def test_whole_runs_agree_with_lora(level6_dirs, tmp_path):
    config = level6_config(tmp_path, level6_dirs, kl="fixed", lora=True)
    assert_passed(level6_rows(*run_level6(config, tmp_path), label="lora, fixed kl"))
