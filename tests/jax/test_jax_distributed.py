"""Two JAX processes on localhost (gloo collectives, one CPU device each) train SFT exactly as
one process does on the same global batches."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from jax_tiny_runs import make_context

from jax_rlhf import distributed
from jax_rlhf.params import to_host
from jax_rlhf.train.sft import SFTTrainer
from shared.config import JaxEngineConfig

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_single_process_without_cluster_settings(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.initialize(JaxEngineConfig()) is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert distributed.slurm_world() == (4, 2)


def test_two_processes_match_one(tiny_config, tmp_path):
    # per device 4 x 2 processes = the single process's 8 rows per step
    two = tiny_config(sft={"per_device_train_batch_size": 4, "per_device_eval_batch_size": 32,
                           "max_steps": 3})
    one = tiny_config(sft={"per_device_train_batch_size": 8, "per_device_eval_batch_size": 64,
                           "max_steps": 3})
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    script = str(Path(__file__).with_name("distributed_sft.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(two), str(tmp_path / "two"), address, "2", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == 2

    ctx = make_context(one, tmp_path / "one")
    trainer = SFTTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)
    logged = []
    ctx.logger.log = lambda step, i, metrics, **kw: logged.append(metrics)
    eval_metrics = trainer.loop.fit(trainer)
    losses = [m["loss"] for m in logged if "loss" in m]
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(result["eval_loss"], eval_metrics["eval_loss"], rtol=1e-5)
    for name, value in to_host(trainer.state.params).items():
        np.testing.assert_allclose(result["checksum"][name], np.abs(value).sum(), rtol=1e-5)
