"""DeepSpeed JSON configs, single-process distributed set-up and engine creation.

The configs reproduce DeepSpeed-Chat's ``get_train_ds_config`` / ``get_eval_ds_config``
(``dschat/utils/ds_utils.py``) with the batch sizes filled in instead of patched in
afterwards, plus two keys DeepSpeed needs for the optimizer we pass in: a
``torch.optim.AdamW`` (DeepSpeed's FusedAdam and DeepSpeedCPUAdam need compiled ops,
unavailable on a CPU-only machine) is "untested" for ZeRO and, with offload, not
DeepSpeed's CPU Adam. Both are allowed explicitly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HybridEngineUnavailable",
    "init_distributed",
    "initialize_engine",
    "make_ds_config",
    "make_eval_ds_config",
    "reference_zero_stage",
]

_DTYPES = ("fp32", "bf16", "fp16")
# DS-Chat's ZeRO-3 knobs: parameters under 1e4 elements stay resident on every rank;
# at most 3e7 elements are live / prefetched at once.
_PERSISTENCE_THRESHOLD = 1e4
_MAX_LIVE_PARAMETERS = 3e7
_PREFETCH_BUCKET_SIZE = 3e7


class HybridEngineUnavailable(RuntimeError):
    """The DeepSpeed Hybrid Engine cannot build or generate on this machine / model."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {value!r} is invalid; {allowed}")


def _dtype_block(dtype: str, *, train: bool) -> dict[str, Any]:
    _check(dtype in _DTYPES, "dtype", dtype, f"allowed: {', '.join(_DTYPES)}")
    if dtype == "fp16":
        # DS-Chat: the loss scale may grow after 100 overflow-free steps (training only).
        return {"fp16": {"enabled": True, **({"loss_scale_window": 100} if train else {})}}
    if dtype == "bf16":
        # a step with a non-finite gradient norm is skipped (DeepSpeed's overflow path), as
        # fp16 and fp32 ZeRO do without asking; see torch_rlhf.optim.optimizer_step
        return {"bf16": {"enabled": True, "check_grad_overflow": True}}
    return {}


def _batch_block(micro: int, accumulation: int, world_size: int) -> dict[str, int]:
    _check(micro >= 1, "train_micro_batch_size_per_gpu", micro, "must be >= 1")
    _check(accumulation >= 1, "gradient_accumulation_steps", accumulation, "must be >= 1")
    _check(world_size >= 1, "world_size", world_size, "must be >= 1")
    return {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
    }


def make_ds_config(
    *,
    stage: int,
    offload: bool,
    dtype: str,
    train_micro_batch_size_per_gpu: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    max_grad_norm: float = 1.0,
    enable_hybrid_engine: bool = False,
    inference_tp_size: int = 1,
    release_inference_cache: bool = False,
    pin_parameters: bool = True,
    tp_gather_partition_size: int = 8,
    max_out_tokens: int = 512,
    tensorboard: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of a trained engine (SFT model, reward model, actor, critic).

    Args:
      stage: ZeRO stage 0-3.
      offload: put optimizer state (and, under ZeRO-3, parameters) in CPU memory.
      dtype: fp32 | bf16 | fp16 (fp16 with dynamic loss scaling).
      train_micro_batch_size_per_gpu: per-rank batch of one forward/backward.
      gradient_accumulation_steps: micro-batches per optimizer step.
      world_size: ranks; train_batch_size = micro * accumulation * world_size.
      max_grad_norm: global gradient-norm clip; 0 disables.
      enable_hybrid_engine: generate with DeepSpeed's inference kernels (CUDA only; see
        ``torch_rlhf.generation.select_rollout_path``).
      inference_tp_size: Hybrid Engine tensor-parallel degree for generation.
      release_inference_cache: free the Hybrid Engine's KV cache after each generate.
      pin_parameters: keep gathered parameters between generate calls (DS-Chat's
        ``not --unpin_actor_parameters``).
      tp_gather_partition_size: layers the Hybrid Engine gathers at a time.
      max_out_tokens: prompt + answer length the Hybrid Engine's cache must hold.
      tensorboard: DeepSpeed's own TensorBoard monitor, ``{"output_path": ...,
        "job_name": ...}``; None leaves it off.
    """
    _check(stage in (0, 1, 2, 3), "stage", stage, "allowed: 0, 1, 2, 3")
    _check(max_grad_norm >= 0, "max_grad_norm", max_grad_norm, "must be >= 0")
    _check(inference_tp_size >= 1, "inference_tp_size", inference_tp_size, "must be >= 1")
    _check(tp_gather_partition_size >= 1, "tp_gather_partition_size",
           tp_gather_partition_size, "must be >= 1")
    _check(max_out_tokens >= 1, "max_out_tokens", max_out_tokens, "must be >= 1")
    device = "cpu" if offload else "none"
    config: dict[str, Any] = {
        **_batch_block(train_micro_batch_size_per_gpu, gradient_accumulation_steps, world_size),
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "offload_param": {"device": device},  # read only by ZeRO-3
            "offload_optimizer": {"device": device},
            "stage3_param_persistence_threshold": _PERSISTENCE_THRESHOLD,
            "stage3_max_live_parameters": _MAX_LIVE_PARAMETERS,
            "stage3_prefetch_bucket_size": _PREFETCH_BUCKET_SIZE,
            "memory_efficient_linear": False,
        },
        **_dtype_block(dtype, train=True),
        "gradient_clipping": float(max_grad_norm),
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "hybrid_engine": {
            "enabled": enable_hybrid_engine,
            "max_out_tokens": max_out_tokens,
            "inference_tp_size": inference_tp_size,
            "release_inference_cache": release_inference_cache,
            "pin_parameters": pin_parameters,
            "tp_gather_partition_size": tp_gather_partition_size,
        },
    }
    if tensorboard is not None:
        missing = {"output_path", "job_name"} - set(tensorboard)
        _check(not missing, "tensorboard", dict(tensorboard), f"needs keys {sorted(missing)}")
        config["tensorboard"] = {"enabled": True, "output_path": tensorboard["output_path"],
                                 "job_name": tensorboard["job_name"]}
    return config


def reference_zero_stage(trained_stage: int) -> int:
    """ZeRO stage of a frozen model beside a trained one (reference beside the actor,
    reward beside the critic): 3 if the trained model is sharded, else 0 (a full copy per
    rank), as DS-Chat's ``_init_ref`` / ``_init_reward`` decide."""
    _check(trained_stage in (0, 1, 2, 3), "stage", trained_stage, "allowed: 0, 1, 2, 3")
    return 3 if trained_stage == 3 else 0


def make_eval_ds_config(
    *,
    stage: int,
    offload: bool,
    dtype: str,
    train_micro_batch_size_per_gpu: int = 1,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed config of a frozen inference engine (reference, reward model).

    Args:
      stage: 0 or 3 (see :func:`reference_zero_stage`).
      offload: keep the parameters in CPU memory (ZeRO-3; DS-Chat
        ``--offload_reference_model``).
      dtype: fp32 | bf16 | fp16.
      train_micro_batch_size_per_gpu, gradient_accumulation_steps, world_size: unused
        for inference but checked by DeepSpeed's config validation.
    """
    _check(stage in (0, 3), "stage", stage, "allowed for an inference engine: 0, 3")
    return {
        **_batch_block(train_micro_batch_size_per_gpu, gradient_accumulation_steps, world_size),
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": _PERSISTENCE_THRESHOLD,
            "offload_param": {"device": "cpu" if offload else "none"},
            "memory_efficient_linear": False,
        },
        **_dtype_block(dtype, train=False),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(dist_backend: str | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed; a no-op when already initialised.

    Launched without ``deepspeed``/``torchrun`` (no RANK in the environment), runs as a
    world of one on 127.0.0.1 and a free port, so concurrent processes never collide.
    ``dist_backend`` None: nccl on CUDA, gloo otherwise.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from shared.console import route_library_loggers, stdout_to_log

    with stdout_to_log("deepspeed.stdout"):  # its import-time and op-build prints
        import deepspeed

        route_library_loggers()
        _init_distributed(deepspeed, torch, dist_backend)


def _init_distributed(deepspeed, torch, dist_backend: str | None) -> None:
    if "RANK" not in os.environ:
        # a port inherited from a parent process (which may hold it) is never reused
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if dist_backend is None:
        dist_backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=dist_backend, verbose=False)


def initialize_engine(model, *, config: Mapping[str, Any], optimizer=None, lr_scheduler=None):
    """``deepspeed.initialize`` returning only the engine.

    With ``config["hybrid_engine"]["enabled"]``, DeepSpeed builds its inference
    containers here, and how that fails depends on the machine, the model and the
    DeepSpeed / transformers versions (on any CPU its inference ops have no build:
    ``ValueError: This op had not been implemented on CPU backend.``). So with the Hybrid
    Engine enabled any exception is re-raised as :class:`HybridEngineUnavailable` naming
    it (the original chained): callers under ``hybrid_engine: auto`` rebuild without the
    Hybrid Engine, where an error that has nothing to do with it is raised again as it is.
    """
    import deepspeed

    hybrid = bool(config.get("hybrid_engine", {}).get("enabled", False))
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          lr_scheduler=lr_scheduler, config=dict(config))
    except Exception as err:
        if not hybrid:
            raise
        hint = (" (DeepSpeed's inference ops have no CPU build: the Hybrid Engine cannot run "
                "on CPU)" if "not been implemented on CPU" in str(err) else "")
        raise HybridEngineUnavailable(
            f"the DeepSpeed Hybrid Engine could not be built for {type(model).__name__}: "
            f"deepspeed.initialize raised {type(err).__name__}: {err}{hint}; set "
            "engine.torch.hybrid_engine: auto or off to generate through the module"
        ) from err
    _skip_identity_allreduce(engine)
    return engine


def _skip_identity_allreduce(engine) -> None:
    """Turns off DeepSpeed's gradient all-reduce where it is the identity.

    With ZeRO-0 and one data-parallel rank, DeepSpeed's backward still flattens every
    gradient into one buffer, all-reduces it over a group of one and copies it back: 11 % of
    a 100M-parameter SFT step on CPU (docs/performance.md). The result is the gradients
    unchanged, so skip it. Several ranks, ZeRO >= 1 and the bf16 optimizer (a ZeRO optimizer
    whose bookkeeping runs in that epilogue) keep DeepSpeed's path.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if (engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1
            and not isinstance(engine.optimizer, ZeROOptimizer)):
        engine.enable_backward_allreduce = False
