"""DeepSpeed-Chat's step-1/2/3 flags in their own forms, did-you-mean, backend-only keys,
and the recipes' launch lines parsed by the deepspeed launcher's own parser."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import pytest

from shared import cli
from shared.config import (
    DSCHAT_ARGS,
    DSCHAT_STEP_ARGS,
    ConfigError,
    config_from_dict,
    config_keys,
    foreign_engine_keys,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"model": {"actor_model_name_or_path": "a", "critic_model_name_or_path": "c"}}

# DeepSpeed-Chat's step-1 run_13b.sh / step-2 run_350m.sh (../shared/seeds).
STEP1 = ["--data_path", "a", "b", "--data_split", "2,4,4", "--model_name_or_path", "opt-13b",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
         "--max_seq_len", "512", "--learning_rate", "1e-4", "--weight_decay", "0.",
         "--num_train_epochs", "16", "--gradient_accumulation_steps", "1",
         "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0", "--seed", "1234",
         "--gradient_checkpointing", "--zero_stage", "3", "--lora_dim", "128",
         "--lora_module_name", "decoder.layers.", "--deepspeed", "--output_dir", "out"]


def _resolve(command: str, argv: list[str]):
    parser = cli.build_parser()
    args = parser.parse_args(cli.flags_to_overrides([command, *argv], parser))
    return config_from_dict(MINIMAL, args.overrides, command=command)


def test_step1_flags_land_in_sft():
    config = _resolve("sft", STEP1)
    assert config.model.actor_model_name_or_path == "opt-13b"
    assert [d.path for d in config.data.datasets] == ["a", "b"]
    assert config.data.max_seq_len == 512
    assert (config.sft.per_device_train_batch_size, config.sft.num_train_epochs) == (4, 16)
    assert config.sft.optim.learning_rate == 1e-4
    assert config.sft.model.gradient_checkpointing is True
    assert config.sft.model.lora.dim == 128
    assert config.engine.torch.zero_stage == 3
    assert config.output_dir == "out"


def test_step2_flags_land_in_reward():
    config = _resolve("rm", ["--model_name_or_path", "opt-350m", "--learning_rate", "5e-5",
                             "--disable_dropout", "--zero_stage=2", "--num_padding_at_beginning",
                             "1", "--lora-dim", "8"])
    assert config.model.critic_model_name_or_path == "opt-350m"
    assert config.model.actor_model_name_or_path == "a"
    assert config.reward.optim.learning_rate == 5e-5
    assert config.sft.optim.learning_rate == 1e-3  # untouched
    assert config.reward.model.disable_dropout is True
    assert config.reward.model.lora.dim == 8
    assert config.engine.torch.zero_stage == 2
    assert config.data.num_padding_at_beginning == 1


@pytest.mark.parametrize("argv", [["--actor_zero_stage=3"], ["--actor-zero-stage", "3"],
                                  ["--actor-zero-stage=3"], ["actor_zero_stage=3"],
                                  ["actor-zero-stage=3"]],
                         ids=["underscore=", "dashed space", "dashed=", "override",
                              "dashed override"])
def test_dashed_and_spaced_forms(argv):
    assert _resolve("ppo", argv).engine.torch.actor_zero_stage == 3


def test_flags_mix_with_options_and_overrides():
    parser = cli.build_parser()
    argv = ["--local_rank=1", "ppo", "ppo.ppo_epochs=2", "--run_dir", "r", "--enable_ema",
            "--config", "c.yaml", "--actor_learning_rate", "-1e-3", "seed=3"]
    args = parser.parse_args(cli.flags_to_overrides(argv, parser))
    assert (args.local_rank, str(args.run_dir), str(args.config)) == (1, "r", "c.yaml")
    assert args.overrides == ["ppo.ppo_epochs=2", "enable_ema=true",
                              "actor_learning_rate=-1e-3", "seed=3"]


def test_step_tables_point_at_real_keys():
    keys = set(config_keys())
    for command, table in DSCHAT_STEP_ARGS.items():
        for name, alias in table.items():
            assert set(alias.targets) <= keys, (command, name)
    for name, alias in DSCHAT_ARGS.items():
        assert set(alias.targets) <= keys, name


@pytest.mark.parametrize(("override", "command", "suggestion"), [
    ("zero_stag=3", "sft", "zero_stage"),
    ("actor_zero_stag=3", "ppo", "actor_zero_stage"),
    ("ppo.sampling_params.top_k=2", "ppo", "ppo.sampling"),
    ("learning_rate=1e-5", "ppo", "sft.optim.learning_rate"),
])
def test_unknown_override_suggests(override, command, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean .*{re.escape(suggestion)}"):
        parse_override(override, command=command)


def test_unknown_key_in_a_known_section_suggests():
    with pytest.raises(ConfigError, match=r"ppo: unknown key\(s\) ppo_epoch; did you mean "
                                          r"ppo_epochs\?"):
        config_from_dict(MINIMAL, ["ppo.ppo_epoch=2"])


def test_unknown_file_key_suggests():
    with pytest.raises(ConfigError, match=r"ppo: unknown key\(s\) ppo_epoch; did you mean "
                                          r"ppo_epochs\?"):
        config_from_dict({**MINIMAL, "ppo": {"ppo_epoch": 2}})


def test_launcher_only_flags_are_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_override("--deepspeed=true") == []
        assert parse_override("local_rank=0") == []
    assert "ignoring deepspeed" in caplog.text


def test_other_backends_keys_are_named():
    config = config_from_dict(MINIMAL, ["actor_zero_stage=3", "engine.jax.mesh.fsdp=2"])
    assert foreign_engine_keys(config, "jax") == ["engine.torch.actor_zero_stage"]
    assert foreign_engine_keys(config, "torch") == ["engine.jax.mesh.fsdp"]
    assert foreign_engine_keys(config_from_dict(MINIMAL), "jax") == []


def test_cli_warns_on_the_other_backends_keys(caplog, capsys):
    assert cli.main(["ppo", "--backend", "jax", "--print-config", "--offload"]) == 0
    assert "the jax backend ignores engine.torch.offload" in caplog.text


def _launch_lines() -> list[tuple[str, str]]:
    lines = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            command = line.lstrip("#").strip()
            if command.split(" ", 1)[0] in ("deepspeed", "rlhf", "torchrun"):
                lines.append((path.name, command))
    return lines


def test_every_recipe_has_a_launch_line():
    named = {name for name, _ in _launch_lines()}
    assert named == {p.name for p in (REPO / "configs").glob("*.yaml")}


@pytest.mark.parametrize(("recipe", "line"), _launch_lines(),
                         ids=[name for name, _ in _launch_lines()])
def test_recipe_launch_line_works_as_written(recipe, line, monkeypatch, capsys):
    """The worker command the launcher builds (deepspeed/launcher/launch.py: ``python -u -m
    SCRIPT --local_rank=N ARGS``) goes through our parser and loads the recipe."""
    tokens = shlex.split(line)
    if tokens[0] == "deepspeed":
        runner = pytest.importorskip("deepspeed.launcher.runner")
        launch = runner.parse_args(tokens[1:])
        assert launch.module and launch.user_script == "shared.cli", line
        argv = ["--local_rank=0", *launch.user_args]
    else:
        assert tokens[0] == "rlhf", line
        argv = tokens[1:]
    monkeypatch.chdir(REPO)
    assert cli.main([*argv, "--print-config"]) == 0
    assert "actor_model_name_or_path" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "line"),
                         [(n, c) for n, c in _launch_lines() if c.startswith("deepspeed ")],
                         ids=[n for n, c in _launch_lines() if c.startswith("deepspeed ")])
def test_recipe_launch_line_through_the_real_launcher(recipe, line):
    """The header line run by the deepspeed launcher itself (one CPU process instead of the
    recipe's GPUs, --print-config so nothing trains): about 8 s each."""
    import os
    import socket
    import subprocess
    import sys

    deepspeed = Path(sys.executable).with_name("deepspeed")
    if not deepspeed.exists():
        pytest.skip("the deepspeed launcher is not installed")
    tokens = shlex.split(line)
    at = tokens.index("--num_gpus")
    tokens[at + 1] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [str(deepspeed), "--master_port", port, *tokens[1:], "--print-config"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "actor_model_name_or_path" in result.stdout
