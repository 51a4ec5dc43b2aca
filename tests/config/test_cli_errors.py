"""Failures of the `rlhf` command: one line naming what and where, exit status 2 for bad input,
1 for a failed run, 130 for Ctrl-C, the traceback only with --debug (shared.errors)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from shared import cli, errors
from shared.config import ConfigError
from shared.data import DataError
from shared.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_RUN, InputError, describe

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def _config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"base": str(DEMO), "output_dir": str(tmp_path / "runs"),
                                    **sections}))
    return path


def _tiny_model(tmp_path: Path, *, weights: bytes) -> Path:
    """A model directory whose config.json is the demo's tiny Llama and whose weights file
    holds ``weights``."""
    demo = yaml.safe_load(DEMO.read_text())
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(demo["model"]["actor_config"]))
    (model / "model.safetensors").write_bytes(weights)
    return model


# Each case: (argv, extra environment, exit status, words of the message, whether a backend
# starts, which prints its own INFO lines before the failure).
def _cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], int, tuple, bool]]:
    missing = tmp_path / "no-such-model"
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"seed: 1\n# caf\xe9\n")
    return {
        "bad config key": (["sft", "ppo.no_such_key=1"], {}, EXIT_INPUT,
                           ("invalid config", "no_such_key"), False),
        "config is a directory": (["sft", "--config", str(tmp_path)], {}, EXIT_INPUT,
                                  ("cannot read config file", str(tmp_path)), False),
        "config not UTF-8": (["sft", "--config", str(not_utf8)], {}, EXIT_INPUT,
                             (str(not_utf8), "not UTF-8"), False),
        "missing model dir": (["eval", "--model", str(missing)], {}, EXIT_INPUT,
                              ("--model", f"model directory {missing} does not exist"), False),
        "model dir without config.json": (["chat", "--model", str(tmp_path)], {}, EXIT_INPUT,
                                          (str(tmp_path), "no config.json"), False),
        "missing --actor": (["ppo", "--actor", str(missing)], {}, EXIT_INPUT,
                            ("--actor", str(missing)), False),
        "hub name offline": (["eval", "--model", "no-such-org/no-such-model"],
                             {"HF_HUB_OFFLINE": "1"}, EXIT_INPUT,
                             ("no-such-org/no-such-model", "HF_HUB_OFFLINE",
                              "pass a local directory"), False),
        "missing export checkpoint": (["export", "--checkpoint", str(missing)], {}, EXIT_INPUT,
                                      ("--checkpoint", str(missing)), False),
        "bad data path": (
            ["sft", "--config", str(_config(tmp_path, data={"datasets": [
                {"path": str(tmp_path / "none.jsonl"), "format": "sft", "steps": ["sft"]}]}))],
            {}, EXIT_INPUT, (str(tmp_path / "none.jsonl"), "no such file"), True),
        "corrupt weights": (["eval", "--backend", "torch", "--model",
                             str(_tiny_model(tmp_path, weights=b"\x00" * 64))], {}, EXIT_INPUT,
                            ("model.safetensors", "corrupt"), True),
    }


CASES = ["bad config key", "config is a directory", "config not UTF-8", "missing model dir",
         "model dir without config.json", "missing --actor", "hub name offline",
         "missing export checkpoint", "bad data path", "corrupt weights"]


def _rlhf(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    launcher = ("RLHF_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    full_env = {k: v for k, v in os.environ.items() if k not in launcher}
    full_env.update(HF_HUB_CACHE=str(cwd / "hf-cache"), **env)
    return subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", CASES)
def test_failure_is_one_line_with_its_exit_status(case, tmp_path):
    argv, env, status, words, backend_starts = _cases(tmp_path)[case]
    result = _rlhf(argv, env, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    errors_logged = [line for line in lines if " ERROR " in line]
    assert len(errors_logged) == 1, result.stderr
    for word in words:
        assert word in errors_logged[0], errors_logged[0]
    if not backend_starts:  # nothing else printed: no framework was even imported
        assert lines == errors_logged
    if case == "bad data path":  # the failed run's directory is kept as it was
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert (run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("where", ["before the command", "after the command", "RLHF_DEBUG"])
def test_debug_prints_the_traceback(where, tmp_path):
    args = ["eval", "--model", str(tmp_path / "missing")]
    argv = {"before the command": ["--debug", *args], "after the command": [*args, "--debug"],
            "RLHF_DEBUG": args}[where]
    result = _rlhf(argv, {"RLHF_DEBUG": "1"} if where == "RLHF_DEBUG" else {}, tmp_path)
    assert result.returncode == EXIT_INPUT
    assert "Traceback (most recent call last)" in result.stderr
    assert "model directory" in result.stderr


def test_help_documents_exit_statuses_and_debug(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--debug" in out
    for words in ("2 bad input", "1 a run that failed", "130 interrupted"):
        assert words in out


# --------------------------------------------------------------------------- in process


def test_hub_unreachable_fails_fast_with_the_hint(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(errors, "hub_reachable", lambda: False)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["eval", "--model", "some-org/some-model"]) == EXIT_INPUT
    assert ("could not reach the Hugging Face Hub for model some-org/some-model"
            in caplog.text)
    assert "HF_HUB_OFFLINE=1" in caplog.text


def test_cached_hub_model_loads_offline_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(errors, "hub_reachable", lambda: False)
    assert errors.check_model_source("some-org/some-model") == "cache"


def _fake_backend(monkeypatch, raise_: BaseException) -> None:
    fake = types.ModuleType("torch_rlhf.cli")

    def run(command, config, args):
        raise raise_

    fake.run = run
    monkeypatch.setitem(sys.modules, "torch_rlhf.cli", fake)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: sys.modules[name])


@pytest.mark.parametrize("exc, status, words", [
    (errors.Interrupted("/runs/demo-1", "ppo"), EXIT_INTERRUPTED,
     ("interrupted", "/runs/demo-1", "latest checkpoint: none yet",
      "`rlhf ppo` command plus `--resume --run-dir /runs/demo-1`")),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, ("interrupted",)),
    (errors.RunError("step 7: the loss is NaN"), EXIT_RUN, ("step 7",)),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"), EXIT_RUN,
     ("no space left", "/runs/x/model.safetensors")),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), EXIT_RUN,
     ("read-only", "/ro/run")),
], ids=["interrupted", "ctrl-c", "run error", "disk full", "read-only"])
def test_backend_failures_are_one_line(monkeypatch, caplog, exc, status, words):
    _fake_backend(monkeypatch, exc)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["ppo", "--backend", "torch"]) == status
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is None and "\n" not in record.getMessage()
    for word in words:
        assert word in record.getMessage()


def test_unexpected_exception_keeps_its_traceback(monkeypatch, caplog):
    _fake_backend(monkeypatch, TypeError("unsupported operand"))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["ppo", "--backend", "torch"]) == EXIT_RUN
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and "unexpected TypeError" in record.getMessage()


@pytest.mark.parametrize("exc, logged", [
    (DataError("train.jsonl:3: malformed JSON"), False),
    (errors.RunError("the loss is NaN"), True),
], ids=["input error: rank 0 speaks", "run error: every rank"])
def test_other_ranks_stay_quiet_on_input_errors(monkeypatch, caplog, exc, logged):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "_QUIET_RANK_EXIT_DELAY_S", 0.0)
    _fake_backend(monkeypatch, exc)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["ppo", "--backend", "torch"]) == exc.exit_code
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert messages == (["rank 1: the loss is NaN"] if logged else [])


# --------------------------------------------------------------------------- the mapping


def _read(path: Path) -> str:
    return path.read_text()


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no exception")


def _in_module(module: str, exc: Exception):
    """A function of module ``module`` that raises ``exc``."""
    namespace = {"__name__": module, "exc": exc}
    exec("def raise_it():\n    raise exc\n", namespace)  # noqa: S102
    return namespace["raise_it"]


def _hub_error(name: str) -> Exception:
    cls = type(name, (Exception,), {"__module__": "huggingface_hub.errors"})
    return cls("boom")


def test_describe_maps_library_exceptions(tmp_path, monkeypatch):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b"\xff\xfe")
    unicode_error = _raised(_read, bad)
    json_error = _raised(json.loads, "{")
    safetensor_error = type("SafetensorError", (Exception,), {})("invalid header length")
    table = {
        "missing file": (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
                         EXIT_INPUT, "/x/y: no such file or directory"),
        "our FileNotFoundError": (_raised(_in_module("shared.fake", FileNotFoundError(
            "no complete checkpoint in /c"))), EXIT_INPUT, "no complete checkpoint in /c"),
        "our RuntimeError": (_raised(_in_module("torch_rlhf.fake", RuntimeError(
            "every answer is too short"))), EXIT_RUN, "every answer is too short"),
        "not a directory": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"),
                            EXIT_INPUT, "/f/x: not a directory"),
        "disk full": (OSError(errno.ENOSPC, "No space left on device", "/r/m"), EXIT_RUN,
                      "no space left on device writing /r/m"),
        "read-only fs": (OSError(errno.EROFS, "Read-only file system", "/r"), EXIT_RUN,
                         "cannot write /r: read-only file system"),
        "cannot write": (PermissionError(errno.EACCES, "Permission denied",
                                         str(tmp_path / "new")), EXIT_RUN, "cannot write"),
        "not UTF-8": (unicode_error, EXIT_INPUT, f"{bad}: not UTF-8 text"),
        "bad JSON": (json_error, EXIT_INPUT, "invalid JSON at line 1 column 2"),
        "corrupt safetensors": (safetensor_error, EXIT_INPUT, "corrupt or unreadable safetensors"),
        "hub offline": (_hub_error("LocalEntryNotFoundError"), EXIT_INPUT,
                        "could not reach the Hugging Face Hub"),
        "hub other": (_hub_error("RepositoryNotFoundError"), EXIT_INPUT, "boom"),
        "memory": (MemoryError(), EXIT_RUN, "out of memory"),
        "config": (ConfigError("ppo.x: unknown"), EXIT_INPUT, "ppo.x: unknown"),
        "our ValueError": (_raised(errors.check_model_source, str(tmp_path / "no")), EXIT_INPUT,
                           "does not exist"),
        "ctrl-c": (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    }
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name, (exc, status, words) in table.items():
        failure = describe(exc)
        assert failure is not None, name
        assert (failure.exit_code, words in failure.message) == (status, True), (name, failure)
        assert "\n" not in failure.message


def test_unreadable_existing_file_is_bad_input(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text("{}")
    monkeypatch.setattr(errors.os, "access", lambda *a: False)  # root reads anything
    failure = describe(PermissionError(errno.EACCES, "Permission denied", str(path)))
    assert failure == errors.Failure(EXIT_INPUT, f"{path}: permission denied (cannot read it)")


def test_describe_leaves_bugs_alone():
    assert describe(_raised(int, "x")) is None  # a ValueError raised outside this project
    assert describe(KeyError("k")) is None
    assert describe(TypeError("t")) is None


def test_own_runtime_and_value_errors_are_one_line():
    from shared.pipeline import get_backend

    failure = describe(_raised(get_backend, "tpu"))
    assert failure is not None and failure.exit_code == EXIT_INPUT
    assert "backend: 'tpu' is invalid" in failure.message


def test_interrupt_names_the_latest_checkpoint(tmp_path):
    for step, tag in (("sft", "step-00000004"), ("ppo", "iter-00000001"), ("ppo", "iter-2")):
        (tmp_path / step / "checkpoints" / tag).mkdir(parents=True)
    (tmp_path / "sft" / "checkpoints" / "step-00000004" / "COMPLETE").touch()
    os.utime(tmp_path / "sft" / "checkpoints" / "step-00000004" / "COMPLETE", (1, 1))
    (tmp_path / "ppo" / "checkpoints" / "iter-00000001" / "COMPLETE").touch()
    message = str(errors.Interrupted(tmp_path, "pipeline"))
    assert f"latest checkpoint: {tmp_path / 'ppo' / 'checkpoints' / 'iter-00000001'})" in message


def test_taxonomy():
    assert issubclass(ConfigError, InputError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)
    assert issubclass(errors.ModelSourceError, InputError)
    assert issubclass(errors.RunError, RuntimeError)
    assert (InputError.exit_code, errors.RunError.exit_code, errors.Interrupted.exit_code) \
        == (2, 1, 130)


def test_one_line_joins_and_cuts():
    assert errors.one_line("a\n  b\n\nc") == "a; b; c"
    assert errors.one_line("x" * 900).endswith("(--debug prints all of it)")


@pytest.mark.parametrize("name, hub", [
    ("gpt2", True), ("facebook/opt-1.3b", True), ("./gpt2", False), ("/abs/model", False),
    ("a/b/c", False), ("org/--x", False), ("~/model", False),
])
def test_is_hub_name(name, hub):
    assert errors.is_hub_name(name) is hub


def test_loading_names_the_model():
    # transformers' ValueError for a directory it cannot read a tokenizer from
    with pytest.raises(InputError, match="^tokenizer /m: Unrecognized model; "):
        with errors.loading("tokenizer", "/m"):
            raise ValueError("Unrecognized model\nShould have a `model_type` key")
    with pytest.raises(InputError, match="^Unrecognized model in /m$"):  # named already
        with errors.loading("tokenizer", "/m"):
            raise ValueError("Unrecognized model in /m")
    with pytest.raises(InputError, match="model /m: a safetensors file: corrupt"):
        with errors.loading("model", "/m"):
            raise _raised(_in_module("safetensors.torch", type(
                "SafetensorError", (Exception,), {})("invalid header")))
