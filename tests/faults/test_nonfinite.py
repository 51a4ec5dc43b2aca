"""NaN and infinity injected end to end (``rlhf sft|rm|ppo`` in this process, a backend
monkeypatched): into PPO's rollout rewards (scores), values, log-probs and reference
log-probs, into gradients (a NaN advantage in PPO, a NaN loss normaliser or loss mask in SFT
and the reward model) and into the weights handed to the final export.

What must hold (shared/guard.py, shared/exports.py): a skipped optimiser step is counted in
``skipped_steps``; the run carries on after a passing fault and ends with finite weights; a
fault that persists stops the run after ``guard.max_consecutive_skips`` (2 here) skips in a
row with exit status 1 and one line naming the step, the quantity and the last good
checkpoint, before any final model is written; ``--resume`` without the fault finishes from
that checkpoint; a final model with a non-finite weight is never recorded.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from fault_harness import SEED, all_finite, checkpoint_dirs, records, write_config
from inprocess import assert_one_line, command_argv, poisoned, rlhf_main

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]

PPO_STEPS_PER_ITERATION = 8
"""ppo_epochs (2) x rollout rows (2 x 8) / per_device_training_batch_size (4)."""

_PPO = {"torch": "torch_rlhf.ppo", "jax": "jax_rlhf.train.ppo"}
_SFT = {"torch": "torch_rlhf.sft", "jax": "jax_rlhf.train.sft"}
_REWARD = {"torch": "torch_rlhf.reward", "jax": "jax_rlhf.train.reward"}


def _cls(modules: dict[str, str], backend: str, name: str):
    return getattr(importlib.import_module(modules[backend]), name)


@pytest.fixture
def config(tmp_path, data_cache):
    return write_config(tmp_path, data_cache, {"seed": SEED,
                                               "guard": {"max_consecutive_skips": 2}})


def _summary(run_dir) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _skipped(run_dir, step: str) -> list[int]:
    return [r["skipped_steps"] for r in records(run_dir) if r["step"] == step
            and "skipped_steps" in r]


def _poison_score(monkeypatch, backend: str, quantity: str, value: float, iterations) -> None:
    cls = _cls(_PPO, backend, "PPOTrainer")
    original = cls.score

    def score(self, *args, **kwargs):
        out = dict(original(self, *args, **kwargs))
        if iterations is None or self.iteration + 1 in iterations:
            out[quantity] = poisoned(out[quantity], value)
        return out

    monkeypatch.setattr(cls, "score", score)


def _poison_advantages(monkeypatch, backend: str, iterations) -> None:
    """A NaN advantage in the first micro-batch of the first optimiser step of each of
    ``iterations`` (None: of every step): the actor's gradients are NaN."""
    cls = _cls(_PPO, backend, "PPOTrainer")
    original = cls.train_step
    done: set[int] = set()

    def train_step(self, micro_batches, **kwargs):
        iteration = self.iteration + 1
        if iterations is None or (iteration in iterations and iteration not in done):
            done.add(iteration)
            micro_batches = [dict(m) for m in micro_batches]
            micro_batches[0]["advantages"] = poisoned(micro_batches[0]["advantages"], np.nan)
        return original(self, micro_batches, **kwargs)

    monkeypatch.setattr(cls, "train_step", train_step)


ROLLOUT_FAULTS = {
    "scores-nan": ("scores", np.nan),
    "values-inf": ("values", np.inf),
    "logprobs-nan": ("logprobs", np.nan),
    "ref_logprobs-neginf": ("ref_logprobs", -np.inf),
}
FAST_ROLLOUT = {("torch", "scores-nan"), ("jax", "values-inf")}


def _rollout_cases():
    for backend in ("torch", "jax"):
        for fault in ROLLOUT_FAULTS:
            marks = () if (backend, fault) in FAST_ROLLOUT else (pytest.mark.slow,)
            yield pytest.param(backend, fault, id=f"{backend}-{fault}", marks=marks)


@pytest.mark.parametrize(("backend", "fault"), list(_rollout_cases()))
def test_a_passing_rollout_fault_is_skipped_and_counted(backend, fault, config, tmp_path,
                                                        monkeypatch, caplog):
    """Iteration 2 of 3 sees the fault: it trains nothing (its 8 optimiser steps count as
    skipped), the others train, the run ends with finite weights."""
    quantity, value = ROLLOUT_FAULTS[fault]
    _poison_score(monkeypatch, backend, quantity, value, {2})
    run_dir = tmp_path / "run"
    outcome = rlhf_main(command_argv("ppo", config, backend, run_dir), caplog)
    assert outcome.status == 0, outcome.message
    assert _skipped(run_dir, "ppo") == [0, PPO_STEPS_PER_ITERATION, PPO_STEPS_PER_ITERATION]
    assert any(quantity in w.getMessage() and "iteration 2" in w.getMessage()
               for w in outcome.warnings)
    assert "ppo" in _summary(run_dir)
    for name in ("final", "critic", "ema"):
        assert all_finite(run_dir / "ppo" / name), name


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_lasting_rollout_fault_stops_the_run_and_resume_finishes(backend, config, tmp_path,
                                                                    monkeypatch, caplog):
    """Scores NaN from iteration 2 on: iterations 2 and 3 would be skipped; the second skip
    in a row stops the run (exit 1, one line) before any final model, naming the last good
    checkpoint (iteration 2's, whose iteration trained nothing); once the reward model is
    fixed, --resume finishes from it."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _poison_score(patch, backend, "scores", np.nan, {2, 3})
        outcome = rlhf_main(command_argv("ppo", config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "ppo iteration 3", "scores", "2 skips in a row",
                    "guard.max_consecutive_skips", "iter-00000002")
    assert not (run_dir / "ppo" / "final").exists()
    assert "ppo" not in _summary(run_dir)
    assert checkpoint_dirs(run_dir, "ppo") == {"iter-00000002": True}
    assert _skipped(run_dir, "ppo") == [0, PPO_STEPS_PER_ITERATION]

    outcome = rlhf_main(command_argv("ppo", config, backend, run_dir, resume=True), caplog)
    assert outcome.status == 0, outcome.message
    assert _skipped(run_dir, "ppo") == [0, PPO_STEPS_PER_ITERATION, PPO_STEPS_PER_ITERATION]
    assert all_finite(run_dir / "ppo" / "final")


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_non_finite_gradients_are_never_applied(backend, config, tmp_path, monkeypatch,
                                                caplog):
    """A NaN advantage in one step of iteration 2: that step is skipped (1 in
    skipped_steps), the run ends with finite weights. In every step: the second step stops
    the run in iteration 1, before any checkpoint."""
    with monkeypatch.context() as patch:
        _poison_advantages(patch, backend, {2})
        outcome = rlhf_main(command_argv("ppo", config, backend, tmp_path / "once"), caplog)
    assert outcome.status == 0, outcome.message
    assert _skipped(tmp_path / "once", "ppo") == [0, 1, 1]
    assert all_finite(tmp_path / "once" / "ppo" / "final")

    with monkeypatch.context() as patch:
        _poison_advantages(patch, backend, None)
        outcome = rlhf_main(command_argv("ppo", config, backend, tmp_path / "always"), caplog)
    assert_one_line(outcome, 1, "ppo iteration 1", "actor_grad_norm", "2 skips in a row",
                    "no checkpoint was written yet")
    assert not (tmp_path / "always" / "ppo" / "final").exists()


def _poison_supervised(monkeypatch, backend: str, step: str, calls) -> None:
    """NaN gradients in the optimiser steps ``calls`` (1-based; None: every one) of ``step``:
    the loss of each micro-batch is multiplied by NaN (torch: the micro-batch's loss tensor;
    JAX: the traced loss, by a per-row factor the batch carries, 1 or NaN)."""
    modules, name = (_SFT, "SFTTrainer") if step == "sft" else (_REWARD, "RewardTrainer")
    cls = _cls(modules, backend, name)
    state = {"steps": 0, "now": False}
    train_step = cls.train_step

    def counted_train_step(self, batch):
        state["steps"] += 1
        state["now"] = calls is None or state["steps"] in calls
        try:
            return train_step(self, batch)
        finally:
            state["now"] = False

    monkeypatch.setattr(cls, "train_step", counted_train_step)
    if backend == "torch":
        micro_step = cls.micro_step

        def poisoned_micro_step(self, batch, normalizer):
            loss, stats = micro_step(self, batch, normalizer)
            return (loss * float("nan") if state["now"] else loss), stats

        monkeypatch.setattr(cls, "micro_step", poisoned_micro_step)
        return
    import jax.numpy as jnp

    batch_arrays, loss = cls.batch_arrays, cls.loss

    def poisoned_batch_arrays(self, batch):
        arrays = dict(batch_arrays(self, batch))
        rows = len(next(iter(arrays.values())))
        arrays["poison"] = np.full(rows, np.nan if state["now"] else 1.0, np.float32)
        return arrays

    def poisoned_loss(spec, model, micro_batch, normalizer):
        value, metrics = loss(spec, model, micro_batch, normalizer)
        factor = jnp.prod(micro_batch["poison"])
        return value * factor, {**metrics, "loss": metrics["loss"] * factor}

    monkeypatch.setattr(cls, "batch_arrays", poisoned_batch_arrays)
    monkeypatch.setattr(cls, "loss", staticmethod(poisoned_loss))


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_supervised_steps_skip_non_finite_gradients(backend, config, tmp_path, monkeypatch,
                                                    caplog):
    """SFT with NaN gradients in step 2 of 3 ends with finite weights, skipped_steps
    [0, 1, 1]."""
    _poison_supervised(monkeypatch, backend, "sft", {2})
    outcome = rlhf_main(command_argv("sft", config, backend, tmp_path / "sft"), caplog)
    assert outcome.status == 0, outcome.message
    assert _skipped(tmp_path / "sft", "sft") == [0, 1, 1]
    assert any("sft step 2" in w.getMessage() for w in outcome.warnings)
    assert all_finite(tmp_path / "sft" / "sft" / "final")


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_lasting_supervised_fault_stops_naming_the_checkpoint(backend, config, tmp_path,
                                                                monkeypatch, caplog):
    """A reward model whose every loss is NaN stops at step 2 (exit 1, one line) with no final
    model, naming step 1's checkpoint (complete, and the one --resume would use)."""
    _poison_supervised(monkeypatch, backend, "reward", None)
    run_dir = tmp_path / "rm"
    outcome = rlhf_main(command_argv("rm", config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "reward step 2", "loss", "2 skips in a row",
                    "reward/checkpoints/step-00000001")
    assert checkpoint_dirs(run_dir, "reward") == {"step-00000001": True}
    assert not (run_dir / "reward" / "final").exists()
    assert "reward" not in _summary(run_dir)


def _poison_export(monkeypatch, backend: str) -> None:
    """The SFT export writes a NaN into the first weight (a backend that lets one through)."""
    if backend == "torch":
        import torch

        from torch_rlhf import supervised
        from torch_rlhf.models import unwrap_model

        original = supervised.save_hf

        def save_hf(model, tokenizer, out_dir):
            with torch.no_grad():
                next(unwrap_model(model).parameters()).view(-1)[0] = float("nan")
            return original(model, tokenizer, out_dir)

        monkeypatch.setattr(supervised, "save_hf", save_hf)
    else:
        import jax

        from jax_rlhf.train import supervised

        original = supervised.export_hf

        def export_hf(mdef, params, frozen, directory, tokenizer, *args, **kwargs):
            params = jax.tree.map(lambda x: x * np.nan, params)
            return original(mdef, params, frozen, directory, tokenizer, *args, **kwargs)

        monkeypatch.setattr(supervised, "export_hf", export_hf)


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_non_finite_export_is_never_recorded(backend, config, tmp_path, monkeypatch, caplog):
    _poison_export(monkeypatch, backend)
    run_dir = tmp_path / "run"
    outcome = rlhf_main(command_argv("sft", config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "sft/final", "model.safetensors", "NaN or infinite")
    assert not (run_dir / "sft" / "final").exists()
    assert (run_dir / "sft" / "final.rejected").is_dir()
    assert "sft" not in _summary(run_dir)
