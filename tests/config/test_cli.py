"""The `rlhf` command: help texts, config validation, backend dispatch."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import types

import pytest
import yaml

from shared import cli


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if command == "plot":  # reads run directories, no config, no backend
        assert "RUN_DIR" in out and "--out" in out
    else:
        assert "--config" in out and "--backend" in out
    assert cli.COMMANDS[command][1].split()[0] in out


def test_print_config_validates_and_prints(capsys):
    assert cli.main(["ppo", "--print-config", "ppo.ppo_epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ppo"]["ppo_epochs"] == 3


def test_invalid_override_exits_non_zero_naming_the_key(caplog):
    with caplog.at_level(logging.ERROR):
        assert cli.main(["ppo", "ppo.per_device_generation_batch_size=5"]) == 2
    assert "per_device_generation_batch_size" in caplog.text


def test_unbuilt_backend_says_so(monkeypatch, caplog):
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "jax_rlhf.cli":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["sft", "--backend", "jax"]) == 2
    assert "jax backend is not built yet" in caplog.text


def test_missing_framework_names_the_extra(monkeypatch, caplog):
    def fake_import(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed")

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["ppo", "--backend", "torch"]) == 2
    assert "pip install -e .[torch]" in caplog.text


def test_dispatch_passes_command_config_and_args(monkeypatch):
    seen = {}
    fake = types.ModuleType("torch_rlhf.cli")

    def run(command, config, args):
        seen.update(command=command, epochs=config.ppo.ppo_epochs, resume=args.resume)
        return 0

    fake.run = run
    monkeypatch.setitem(sys.modules, "torch_rlhf.cli", fake)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: sys.modules[name])
    assert cli.main(["ppo", "--backend", "torch", "--resume", "ppo.ppo_epochs=2"]) == 0
    assert seen == {"command": "ppo", "epochs": 2, "resume": True}


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "shared.cli", "pipeline", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "pipeline" in out


def test_parity_runs_both_backends_not_one(monkeypatch, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    seen = {}
    fake = types.ModuleType("parity_tests.run")

    def main(config, args):
        seen.update(model=args.model, backend=args.backend)
        return 1

    fake.main = main
    monkeypatch.setitem(sys.modules, "parity_tests.run", fake)
    assert cli.main(["parity", "--model", str(model)]) == 1
    assert seen == {"model": str(model), "backend": "torch"}


def test_bench_runs_both_backends_unless_one_is_named(monkeypatch):
    seen = []
    fake = types.ModuleType("bench.run")
    fake.main = lambda config, args: seen.append(
        (args.backend, args.quick, args.variants, args.write_docs)) or 0
    monkeypatch.setitem(sys.modules, "bench.run", fake)
    assert cli.main(["bench", "--quick"]) == 0
    assert cli.main(["bench", "--backend", "jax", "--variants", "--no-write-docs"]) == 0
    assert seen == [(None, True, False, None), ("jax", False, True, False)]
