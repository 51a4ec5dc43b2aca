"""What `rlhf pipeline` prints on the shipped demo config, counted in lines (issue: `make
demo` printed ~3,300 lines on torch and 276 on JAX, mostly library chatter). The demo is
shortened with max_steps / max_iterations: the console's size does not grow with the step
count (`logging.console_lines` metric lines per step), so the bound is the demo's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
SHORT = ["sft.max_steps=24", "reward.max_steps=24", "ppo.max_iterations=4",
         "eval.samples_per_prompt=1"]


# the JAX case is slow (24 s on 2 cores); the torch case keeps the default suite honest
@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_demo_console_is_short_and_ends_with_the_summary_table(backend, tmp_path):
    run_dir = tmp_path / "run"
    # not this process's launcher variables: an earlier in-process torch test holds its port
    launcher = ("RLHF_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONUNBUFFERED"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "pipeline", "--config",
         str(ROOT / "configs" / "demo.yaml"), "--backend", backend, "--run-dir", str(run_dir),
         *SHORT], cwd=tmp_path, env=env, capture_output=True, timeout=600)
    # bytes, not text=True: universal newlines would turn the bars' carriage returns into
    # line ends, which a terminal does not
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    lines = (out + err).count("\n")
    assert lines <= MAX_LINES, f"{lines} lines:\n{out}\n{err}"
    # results on stdout (pipeable), the table last
    table = out.strip().splitlines()
    assert table[0].split()[:4] == ["step", "time", "steps", "final"]
    assert [row.split()[0] for row in table[2:5]] == ["sft", "reward", "ppo"]
    assert "->" in table[4]  # the held-out metric before (SFT) and after PPO
    assert table[5].startswith(f"outputs: {run_dir}")
    # library chatter is in the run log, not on the console
    log = (run_dir / "run.log").read_text()
    for chatter in ("absl", "DeepSpeed", "[WARNING]", "Loading weights", "data report"):
        assert chatter not in out + err, chatter
    assert "data report" in log
    assert ("absl" if backend == "jax" else "deepspeed") in log
    # the one-time facts once, the per-step metric lines at most logging.console_lines
    assert err.count("rollout path") <= 1
    assert err.count("sft epoch") <= 4 and err.count("ppo iteration") <= 4
