"""`rlhf parity` (`parity_tests.run`): passes on the demo config and on a saved HF directory,
and fails (non-zero exit) when one backend's weights are perturbed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import jax_rlhf.models
from parity_tests import iterations
from parity_tests import run as parity_run
from parity_tests.harness import assert_passed, build_checkpoint
from parity_tests.run import COMMAND_LEVELS, DEFAULT_LEVELS, command_levels, main, run_parity
from shared import cli
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
    assert f"on your model (levels 2-5): {len(rows)}/{len(rows)} passed" in table


def test_level1_through_run_parity(demo_config, capsys):
    rows = run_parity(demo_config, levels_to_run=(1,))
    assert _levels(rows) == ["1"]
    assert_passed(rows)
    captured = capsys.readouterr()
    n = len(rows)
    # progress on stderr as the level starts and ends; the per-level table before the full one
    assert "parity: level 1 (shared functions, numpy vs torch vs JAX) [1/1] ..." in captured.err
    assert f"parity: level 1 done: {n} rows, 0 failed (" in captured.err
    summary, _, table = captured.out.partition("\n\n")
    assert summary.splitlines()[0].split() == ["level", "what", "rows", "passed", "failed"]
    assert summary.splitlines()[2].split()[-3:] == [str(n), str(n), "0"]
    assert "max abs diff" in table and "max abs diff" not in summary


def test_level_summary_counts_each_level():
    rows = [parity_run.Row(level, "q", 0.0, 0.0, None, passed)
            for level, passed in (("1", True), ("1", True), ("2", True), ("2", False))]
    lines = parity_run.level_summary(rows, (2, 1, 6)).splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "6"]
    assert lines[2].split()[-3:] == ["2", "2", "0"]
    assert lines[3].split()[-4:] == ["2", "1", "1", "FAILED"]
    assert lines[4].split()[-4:] == ["0", "0", "0", "(skipped)"]


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
    args = argparse.Namespace(model=str(saved_model), config=DEMO, backend="torch",
                              levels=DEFAULT_LEVELS)
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


USER_CHOICES = ["ppo.preset=deepspeed_chat", "ppo.conventions.kl_coef=0.3",
                "ppo.short_answer_policy=dschat", "ppo.ptx_mode=separate",
                "ppo.gradient_accumulation_steps=2", "data.pad_with_eos=true",
                "ppo.enable_ema=true", "ppo.sampling.temperature=0.9"]
"""`key=value` overrides a user passes to `rlhf parity` (DeepSpeed-Chat's conventions with one
field changed)."""


def test_cli_overrides_reach_run_parity(monkeypatch):
    """`rlhf parity key=value ...`: the config after the overrides reaches `run_parity`, with
    every level (level 6 included)."""
    seen = {}

    def fake_run_parity(config, **kwargs):
        seen.update(config=config, **kwargs)
        return [parity_run.Row("1", "stub", 0.0, 0.0, None, True)]

    monkeypatch.setattr(parity_run, "run_parity", fake_run_parity)
    assert cli.main(["parity", *USER_CHOICES]) == 0
    config = seen["config"]
    assert config.ppo.preset == "deepspeed_chat" and config.ppo.conventions.kl_coef == 0.3
    assert config.ppo.short_answer_policy == "dschat" and config.data.pad_with_eos
    assert tuple(seen["levels_to_run"]) == COMMAND_LEVELS and 6 in COMMAND_LEVELS


def test_level6_runs_the_users_conventions(monkeypatch):
    """`run_parity(levels_to_run=(6,))` runs the built-in level-6 models under the config's
    PPO choices (the runs themselves are stubbed: level 6 is tested in its own module)."""
    config = load_config(DEMO, USER_CHOICES)
    used = []

    def fake_run_level6(level6_config, tmp, **kwargs):
        used.append(level6_config)
        empty = iterations.Level6Result(sft=[], reward=[], ppo=[], tokens=[], weights={})
        return empty, empty

    monkeypatch.setattr(iterations, "run_level6", fake_run_level6)
    assert run_parity(config, levels_to_run=(6,), print_table=False) == []
    (level6,) = used
    ppo = level6.ppo
    assert ppo.preset == "deepspeed_chat"
    assert ppo.conventions == config.ppo.conventions  # every field, the override included
    assert (ppo.short_answer_policy, ppo.ptx_mode, ppo.gradient_accumulation_steps) == (
        "dschat", "separate", 2)
    assert ppo.enable_ema and ppo.ema_beta == config.ppo.ema_beta
    assert ppo.sampling == config.ppo.sampling and level6.data.pad_with_eos
    # the level-6 models, not the demo's
    assert Path(level6.model.actor_model_name_or_path).name == "sft-model"


def test_level6_settings_lora_and_accumulation():
    config = load_config(DEMO, ["ppo.actor.lora.dim=8", "ppo.critic.lora.dim=8",
                                "only_optimize_lora=true", "ppo.gradient_accumulation_steps=3"])
    settings = iterations.level6_settings(config)
    assert settings["lora"] == settings["only_optimize"] == ("actor", "critic")
    # 3 does not divide the 4 mini-batches of 2 generation batches: 3 generation batches
    assert settings["generation_batches"] == 3
    assert settings["conventions"]["shuffle_minibatches"] is True  # the demo's default preset


def test_command_levels():
    assert command_levels(argparse.Namespace()) == COMMAND_LEVELS
    assert command_levels(argparse.Namespace(levels="1, 6")) == (1, 6)
    assert command_levels(argparse.Namespace(levels=[2, 3])) == (2, 3)


def test_level3_with_pad_as_eos_and_deepspeed_chat(capsys):
    """data.pad_with_eos reaches the parity tokenizer (the data levels run) and level 3 masks
    the EOS out of the answers as the deepspeed_chat conventions' mask_pad_tokens does."""
    config = load_config(DEMO, ["ppo.preset=deepspeed_chat", "data.pad_with_eos=true"])
    rows = run_parity(config, levels_to_run=(3,))
    assert "skipped" not in capsys.readouterr().out
    assert any(r.quantity.startswith("ppo actor") for r in rows)
    assert_passed(rows)


def _refused_by_jax() -> str:
    """A model type transformers builds as a causal LM and the JAX backend refuses, asked of
    the backend itself (its family list grows)."""
    import transformers

    for model_type in ("bloom", "mpt", "gptj", "falcon", "mamba"):
        try:
            jax_rlhf.models.ModelConfig.from_hf(transformers.AutoConfig.for_model(model_type))
        except ValueError:
            return model_type
    pytest.skip("the JAX backend supports every candidate model type")


@pytest.mark.parametrize("where", ["--model", "model.actor_config"])
def test_unsupported_model_exits_2_before_any_level(where, tmp_path, monkeypatch, caplog):
    """`rlhf parity` on a model one backend cannot build: exit status 2 (an input error, not
    1, a failed comparison) and one line naming the model type and the supported families,
    before level 1 runs."""
    import transformers

    model_type = _refused_by_jax()
    monkeypatch.setattr(parity_run, "run_parity", lambda *a, **k: pytest.fail("levels ran"))
    if where == "--model":
        transformers.AutoConfig.for_model(model_type).save_pretrained(tmp_path)
        argv = ["parity", "--config", str(DEMO), "--model", str(tmp_path)]
    else:
        argv = ["parity", "--config", str(DEMO), f"model.actor_config={{model_type: {model_type}}}"]
    assert cli.main(argv) == 2
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "\n" not in message and where in message
    assert f"model_type {model_type!r}" in message and "supported" in message


def test_model_unknown_to_transformers_exits_2(tmp_path, monkeypatch, caplog):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model"}')
    monkeypatch.setattr(parity_run, "run_parity", lambda *a, **k: pytest.fail("levels ran"))
    args = argparse.Namespace(model=str(tmp_path), levels=None)
    assert main(load_config(DEMO), args) == 2
    assert "'no_such_model' is unknown to transformers" in caplog.text


def test_pass_count_is_split_by_model_dependence():
    rows = [parity_run.Row(level, "q", 0.0, 0.0, None, passed)
            for level, passed in (("1", True), ("1", True), ("2", True), ("3", False),
                                  ("5", True), ("6", True))]
    assert [parity_run.model_dependent(r) for r in rows] == [False, False, True, True, True,
                                                             False]
    assert parity_run.pass_counts(rows) == (
        "on your model (levels 2-5): 2/3 passed; independent of it (level 1 shared "
        "functions, level 6 built-in tiny Llama): 3/3 passed")
