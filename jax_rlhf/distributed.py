"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the config or SLURM.

Every process runs the same program on the same data; `jax.jit` over the global mesh does
the communication. Where the coordinator comes from (`engine.jax`):

- `coordinator_address: "host:port"` with `num_processes` and `process_id` (each null falls
  back to SLURM's variables): an explicit cluster, e.g. processes started by hand;
- `coordinator_address: auto`: JAX's own cluster detection (SLURM, Cloud TPU pods, Open MPI);
- null, inside a SLURM job with more than one task: SLURM's variables;
- otherwise a single process.

On CPU the collectives between processes go through gloo.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)


def slurm_world() -> tuple[int, int] | None:
    """`(num_processes, process_id)` of a multi-task SLURM job step, else None."""
    tasks, rank = os.environ.get("SLURM_NTASKS"), os.environ.get("SLURM_PROCID")
    if os.environ.get("SLURM_JOB_ID") and tasks and rank and int(tasks) > 1:
        return int(tasks), int(rank)
    return None


def initialize(engine: Any) -> bool:
    """Joins the cluster `engine` (an `engine.jax` config) describes; True when multi-process.

    Must run before anything touches a JAX device. Idempotent.
    """
    if jax.distributed.is_initialized():
        return True
    address = engine.coordinator_address
    slurm = slurm_world()
    if address is None and slurm is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address == "auto" or (address is None and slurm is not None):
        jax.distributed.initialize()
    else:
        num_processes, process_id = engine.num_processes, engine.process_id
        if slurm is not None:
            num_processes = slurm[0] if num_processes is None else num_processes
            process_id = slurm[1] if process_id is None else process_id
        if num_processes is None or process_id is None:
            raise ValueError("engine.jax.coordinator_address needs num_processes and process_id "
                             "(or a SLURM job that provides them)")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def agree_on_path(path: Path | None) -> Path | None:
    """Process 0's `path` on every process (run directories named by a timestamp)."""
    if jax.process_count() == 1 or path is None:
        return path
    from jax.experimental import multihost_utils

    data = np.frombuffer(str(path).encode().ljust(4096, b"\0"), np.uint8)
    agreed = multihost_utils.broadcast_one_to_all(data)
    return Path(bytes(np.asarray(agreed)).rstrip(b"\0").decode())
