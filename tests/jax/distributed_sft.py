"""Run as a script (by test_jax_distributed.py), once per process: a few SFT steps on a mesh
spanning every process's CPU devices; process 0 prints the losses.

usage: distributed_sft.py CONFIG RUN_DIR COORDINATOR NUM_PROCESSES PROCESS_ID
"""

import json
import sys
from pathlib import Path

from shared.config import load_config


def main(config_path, run_dir, address, num_processes, process_id):
    overrides = [
        f"engine.jax.coordinator_address={address}",
        f"engine.jax.num_processes={num_processes}",
        f"engine.jax.process_id={process_id}",
    ]
    cfg = load_config(config_path, overrides)
    from jax_rlhf import distributed

    assert distributed.initialize(cfg.engine.jax)
    import jax

    from jax_rlhf.params import to_host
    from jax_rlhf.train.common import RunContext
    from jax_rlhf.train.sft import SFTTrainer
    from shared.runlog import prepare_run_dir

    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(cfg, run_dir=Path(run_dir), is_main=is_main)
    ctx = RunContext.open(cfg, run_dir)
    trainer = SFTTrainer(cfg, run_dir=run_dir, ctx=ctx)
    losses = []
    ctx.logger.log = lambda step, i, metrics, **kw: losses.append(metrics)
    eval_metrics = trainer.loop.fit(trainer)
    params = to_host(trainer.state.params)
    if is_main:
        print("RESULT " + json.dumps({
            "devices": jax.device_count(),
            "losses": [m["loss"] for m in losses if "loss" in m],
            "eval_loss": eval_metrics["eval_loss"],
            "checksum": {k: float(abs(v).sum()) for k, v in params.items()},
        }))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
