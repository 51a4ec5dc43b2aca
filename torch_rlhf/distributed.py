"""Data parallelism for the trainers: which rows a rank owns, and the few collectives.

Every rank holds the whole *global* batch as numpy arrays (the data layer is cheap and
deterministic) and trains on its contiguous slice, so the rows an optimiser step sees
never depend on the number of ranks: 2 ranks x 4 rows and 1 rank x 8 rows are the same
step. PPO rollouts are made per rank and all-gathered, so advantages, whitening and the
mini-batch schedule are computed on the global buffer, as in a single process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "is_main",
    "rank",
    "rank_rows",
    "world_size",
]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of data-parallel ranks (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on rank 0: the process that writes logs, summaries and HF models."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def rank_rows(num_rows: int) -> slice:
    """The contiguous slice of a global batch of ``num_rows`` rows this rank trains on."""
    size = world_size()
    if num_rows % size:
        raise ValueError(f"a global batch of {num_rows} rows does not split over {size} ranks")
    per_rank = num_rows // size
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def _device() -> torch.device:
    # gloo reduces CPU tensors; nccl needs them on the current CUDA device.
    if _initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Element-wise float64 sum of ``values`` over ranks (a copy when single-process)."""
    array = np.asarray(values, dtype=np.float64)
    if world_size() == 1:
        return array.copy()
    tensor = torch.from_numpy(array).to(_device())
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().numpy()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` [b, ...] along rows, in rank order.

    All ranks must pass the same shape (rollout slices are equal by construction).
    """
    if world_size() == 1:
        return tensor
    device = tensor.device
    local = tensor.contiguous().to(_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts, 0).to(device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a run directory named after a timestamp)."""
    if world_size() == 1:
        return obj
    payload = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]

