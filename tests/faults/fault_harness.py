"""What the fault-injection tests share: a tiny pipeline config, the ``rlhf`` command as a
subprocess (plain, or frozen at a point by ``stop_at.py`` and killed with SIGKILL), and the
comparisons of two run directories (metrics.jsonl row for row, final weights bit for bit).

The tiny pipeline (``write_config``): the demo's data, tokenizer and tiny Llama models with
small batches; SFT and reward 3 optimiser steps, PPO 3 iterations of 2 generation batches,
2 PPO epochs, EMA, a joint ptx loss and DeepSpeed-Chat's short-answer rule (so a checkpoint
holds every kind of state the loops carry); a checkpoint after every step or iteration
(``logging.save_interval=1``), one kept (``logging.keep_checkpoints=1``, so pruning runs at
every save).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
STOP_AT = Path(__file__).with_name("stop_at.py")

SEED = 14
"""Every case's seed (the config's, and the one drawing the slow suite's kill points)."""

TINY: dict[str, Any] = {
    "logging": {"progress_bar": False, "enable_tensorboard": False, "save_interval": 1,
                "keep_checkpoints": 1},
    "sft": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64, "max_steps": 3,
            "num_train_epochs": 1},
    "reward": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
               "max_steps": 3, "num_train_epochs": 1},
    "ppo": {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 4,
            "generation_batches": 2, "max_iterations": 3, "ppo_epochs": 2, "num_train_epochs": 1,
            "enable_ema": True, "unsup_coef": 0.5, "short_answer_policy": "dschat"},
    "eval": {"max_prompts": 8, "samples_per_prompt": 1},
}

FINAL_MODELS = ("sft/final", "reward/final", "ppo/final", "ppo/critic", "ppo/ema")

# Set by a parent test process (an in-process torch run) and wrong for a child, which must
# start its own world of one.
_INHERITED = ("RLHF_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(directory: Path, data_cache: Path | str, overrides: dict[str, Any] | None = None,
                 *, name: str = "config.yaml") -> Path:
    """``directory/name``: the demo + ``TINY`` + ``overrides``, tokenised data cached in
    ``data_cache``."""
    data = merge({"base": str(DEMO), "output_dir": str(Path(directory) / "runs"),
                  "data": {"cache_dir": str(data_cache)}}, TINY)
    data = merge(data, overrides or {})
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_env(jax_cache: Path | str | None = None, **extra: str) -> dict[str, str]:
    """The environment of an ``rlhf`` subprocess: offline, its own torch world, and JAX's
    persistent compilation cache in ``jax_cache`` (a compiled program is the same program
    whether compiled or read back; the cache only saves the tests minutes)."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if jax_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


def rlhf(argv: list[str], *, env: dict[str, str], cwd: Path,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """``rlhf ARGV`` to the end (``python -m shared.cli``), output captured."""
    return subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def pipeline_argv(config: Path, backend: str, run_dir: Path, *, resume: bool = False
                  ) -> list[str]:
    argv = ["pipeline", "--config", str(config), "--backend", backend, "--run-dir", str(run_dir)]
    return [*argv, "--resume"] if resume else argv


def error_lines(stderr: str) -> list[str]:
    """The lines the command logged at ERROR level."""
    return [line for line in stderr.splitlines() if " ERROR " in line]


def assert_one_line_failure(result: subprocess.CompletedProcess, status: int,
                            *words: str) -> str:
    """``result`` exited with ``status``, logged exactly one ERROR line holding ``words`` and
    printed no traceback; returns that line."""
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- killing


def _stopped(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] in ("T", "t")


@dataclasses.dataclass
class Kill:
    """A run killed with SIGKILL: where (``reached``: point, step, occurrence; or the delay)
    and its output log."""

    reached: dict[str, Any]
    log: Path
    seconds: float


@dataclasses.dataclass
class Frozen:
    """A run stopped (SIGSTOP) at a point of ``stop_at.py``, waiting for its SIGKILL."""

    proc: subprocess.Popen
    reached: dict[str, Any]
    log: Path
    started: float

    def kill(self) -> Kill:
        self.proc.kill()  # SIGKILL
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        return Kill(self.reached, self.log, time.perf_counter() - self.started)


def freeze_at(spec: dict[str, Any], argv: list[str], *, env: dict[str, str], cwd: Path,
              workdir: Path, timeout: float = 600) -> Frozen:
    """Runs ``rlhf ARGV`` under ``stop_at.py`` until it freezes at ``spec`` (point, step,
    occurrence). Fails (killing it) when the run ends first or takes over ``timeout``."""
    workdir.mkdir(parents=True, exist_ok=True)
    signal_file = workdir / f"stopped-{time.monotonic_ns()}.json"
    log = signal_file.with_suffix(".log")
    spec = {**spec, "signal_file": str(signal_file)}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(STOP_AT), json.dumps(spec), "--", *argv],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while not (signal_file.is_file() and _stopped(proc.pid)):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before "
                                     f"reaching {spec}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{spec} not reached in {timeout} s")
            time.sleep(0.02)
        return Frozen(proc, json.loads(signal_file.read_text()), log, start)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def kill_at(spec: dict[str, Any], argv: list[str], *, env: dict[str, str], cwd: Path,
            workdir: Path, timeout: float = 600) -> Kill:
    """``freeze_at``, then SIGKILL."""
    return freeze_at(spec, argv, env=env, cwd=cwd, workdir=workdir, timeout=timeout).kill()


def kill_after(seconds: float, argv: list[str], *, env: dict[str, str], cwd: Path,
               workdir: Path) -> Kill:
    """Runs ``rlhf ARGV`` and kills it with SIGKILL after ``seconds`` (or lets it finish)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"killed-{time.monotonic_ns()}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finished = proc.returncode == 0
    assert finished or proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return Kill({"delay": seconds, "finished": finished}, log, time.perf_counter() - start)


# --------------------------------------------------------------------------- comparing


def records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock keys (``time``, ``*_time``)."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k != "time" and not k.endswith("_time")})
    return out


def summary(run_dir: Path) -> dict[str, Any]:
    """summary.json without timings and paths (which name the run directory)."""
    data = json.loads((Path(run_dir) / "summary.json").read_text())
    data.pop("timings", None)
    for entry in data.values():
        if isinstance(entry, dict):
            for key in [k for k in entry if k == "timings" or k.endswith("_model")]:
                entry.pop(key)
    return data


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {model_dir}"
    return tensors


def weight_difference(a: Path, b: Path) -> tuple[bool, float]:
    """(bit for bit equal, largest absolute difference) of two model directories."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), (sorted(wa), sorted(wb))
    bitwise, largest = True, 0.0
    for key in wa:
        x, y = wa[key], wb[key]
        assert x.shape == y.shape and x.dtype == y.dtype, key
        if x.tobytes() != y.tobytes():
            bitwise = False
            largest = max(largest, float(np.max(np.abs(x.astype(np.float64) -
                                                       y.astype(np.float64)))))
    return bitwise, largest


def all_finite(model_dir: Path) -> bool:
    return all(np.isfinite(t).all() for t in weights(model_dir).values()
               if np.issubdtype(t.dtype, np.floating))


def assert_same_run(reference: Path, resumed: Path) -> None:
    """``resumed`` wrote what the uninterrupted ``reference`` wrote: metrics.jsonl row for row
    (wall-clock keys aside), the summary (timings aside), every final model bit for bit."""
    want, have = records(reference), records(resumed)
    assert [(r["step"], r["iteration"]) for r in have] == [
        (r["step"], r["iteration"]) for r in want]
    for i, (a, b) in enumerate(zip(want, have, strict=True)):
        assert a == b, f"metrics.jsonl row {i}: {a} != {b}"
    assert summary(resumed) == summary(reference)
    for name in FINAL_MODELS:
        if (Path(reference) / name).is_dir():
            bitwise, largest = weight_difference(Path(reference) / name, Path(resumed) / name)
            assert bitwise, f"{name}: not bit for bit, largest difference {largest:g}"


def checkpoint_dirs(run_dir: Path, step: str) -> dict[str, bool]:
    """``{checkpoint name: complete}`` of ``step``."""
    root = Path(run_dir) / step / "checkpoints"
    if not root.is_dir():
        return {}
    return {p.name: (p / "COMPLETE").is_file() for p in sorted(root.iterdir()) if p.is_dir()}
