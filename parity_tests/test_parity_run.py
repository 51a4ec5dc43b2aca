"""`rlhf parity` (`parity_tests.run`): passes on the demo config and on a saved HF directory,
and fails (non-zero exit) when one backend's weights are perturbed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import jax_rlhf.models
from parity_tests.harness import assert_passed, build_checkpoint
from parity_tests.run import main, run_parity
from shared.config import load_config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MODEL_LEVELS = (2, 3, 5)


@pytest.fixture(scope="module")
def demo_config():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def saved_model(demo_config, tmp_path_factory):
    """An HF causal-LM directory in the demo's shape, with the demo tokenizer saved beside it
    (what `rlhf sft` writes), but weights drawn independently of the config's seed."""
    tokenizer = AutoTokenizer.from_pretrained(demo_config.model.tokenizer_name_or_path)
    path = tmp_path_factory.mktemp("saved-sft")
    return build_checkpoint(demo_config.model.actor_config, path, kind="lm", seed=7,
                            tokenizer=tokenizer)


def _levels(rows):
    return sorted({r.level for r in rows})


def test_demo_config_passes(demo_config, capsys):
    rows = run_parity(demo_config, levels_to_run=MODEL_LEVELS)
    assert _levels(rows) == ["2", "3", "5"]
    quantities = " ".join(r.quantity for r in rows)
    for expected in ("logits [sft data", "end_scores [ppo prompts", "sft [sft data] grad",
                     "rm bradley_terry [reward data] grad", "ppo actor", "ppo critic",
                     "entropy", "ptx", "sampled tokens"):
        assert expected in quantities
    assert_passed(rows)
    table = capsys.readouterr().out
    assert "max abs diff" in table and f"{len(rows)}/{len(rows)} passed" in table


def test_level1_through_run_parity(demo_config):
    rows = run_parity(demo_config, levels_to_run=(1,), print_table=False)
    assert _levels(rows) == ["1"]
    assert_passed(rows)


def test_saved_model_dir_passes(demo_config, saved_model):
    rows = run_parity(demo_config, model_dir=str(saved_model), levels_to_run=MODEL_LEVELS,
                      print_table=False)
    assert _levels(rows) == ["2", "3", "5"]
    assert_passed(rows)


def _perturbing_loader(monkeypatch, delta: float):
    """Make the JAX backend load one weight off by `delta` (a converter bug, simulated)."""
    original = jax_rlhf.models.load_causal_lm

    def load(path, **kwargs):
        model = original(path, **kwargs)
        kernel = model.model.layers[1].attn.q_proj.kernel
        kernel[...] = kernel[...].at[0, 0].add(delta)
        return model

    monkeypatch.setattr(jax_rlhf.models, "load_causal_lm", load)


def test_perturbed_weight_fails(demo_config, saved_model, monkeypatch):
    # One entry of one 64 x 64 kernel off by 1e-3 (the weights are O(0.2)): the tolerances
    # are tight enough to see it (logits move by ~2e-4).
    _perturbing_loader(monkeypatch, 1e-3)
    rows = run_parity(demo_config, model_dir=str(saved_model), levels_to_run=(2,),
                      print_table=False)
    failed = {r.quantity for r in rows if not r.passed}
    assert "logits [sft data, right-padded]" in failed
    assert all(r.passed for r in rows if r.quantity.startswith(("values", "end_scores")))


def test_main_exit_code(demo_config, saved_model, monkeypatch):
    args = argparse.Namespace(model=str(saved_model), config=DEMO, backend="torch")
    assert main(demo_config, args) == 0
    _perturbing_loader(monkeypatch, 1e-2)
    assert main(demo_config, args) == 1


def test_unknown_level_is_an_error(demo_config):
    with pytest.raises(ValueError, match=r"levels \[7\]"):
        run_parity(demo_config, levels_to_run=(7,))


def test_level4_through_run_parity(demo_config):
    rows = run_parity(demo_config, levels_to_run=(4,), print_table=False)
    assert _levels(rows) == ["4"]
    assert any("params after 3 steps" in r.quantity for r in rows)
    assert_passed(rows)


def test_out_of_vocabulary_data_is_an_error(demo_config, tmp_path):
    small = dict(demo_config.model.actor_config, vocab_size=8)
    path = build_checkpoint(small, tmp_path / "small", kind="lm")
    with pytest.raises(ValueError, match="outside the model's vocabulary of 8"):
        run_parity(demo_config, model_dir=str(path), levels_to_run=(2,), print_table=False)


def test_value_model_dir_runs_the_value_levels_only(demo_config, tmp_path, capsys):
    path = build_checkpoint(demo_config.model.critic_config, tmp_path / "rm", kind="value",
                            seed=3)
    rows = run_parity(demo_config, model_dir=str(path), levels_to_run=(2,))
    assert rows and all(r.quantity.startswith(("values", "end_scores")) for r in rows)
    assert_passed(rows)
    assert "skipped: actor levels" in capsys.readouterr().out
