"""``rlhf plan``: per-device memory of a PPO run, estimated from its config (no framework).

For every model the run builds (``shared.critic_free.models_used``: actor, reference, critic,
reward model; a served ``name@url`` role lives elsewhere and costs nothing here), in bytes:

- **weights**: parameters x dtype bytes (fp32 4, bf16/fp16 2); ZeRO-3 divides the trained
  models' by ``world_size``; ``offload`` at ZeRO-3 (DeepSpeed ``offload_param``) and
  ``ppo.offload_reference_model`` move them to the host.
- **gradients** (actor, critic): trainable parameters x dtype bytes, / ``world_size`` from
  ZeRO-2 on; to the host with ``offload`` (from ZeRO-1 on, as DeepSpeed's offload does).
  With LoRA and ``only_optimize`` only the adapters (and a critic's value head) are
  trainable.
- **optimiser** (actor, critic): Adam's fp32 ``m`` and ``v`` (8 bytes per trainable
  parameter) plus an fp32 master copy in mixed precision (4 more): the ZeRO paper's
  2 + 2 + 12 = 16 bytes per parameter with the weights and gradients (Rajbhandari et al.
  2020, section 3.1); / ``world_size`` from ZeRO-1 on; ``offload`` moves it to the host.
  DeepSpeed's ZeRO-1/2/3 optimisers hold more than the paper: an fp32 master partition
  whatever the dtype, and in mixed precision an fp32 gradient partition too (its estimator's
  "18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states"), so from ZeRO-1 on both
  dtypes cost 20 bytes per parameter over the ranks. At ZeRO-1/2 this equals DeepSpeed's
  ``estimate_zero2_model_states_mem_needs`` (2P + 18P/N). At ZeRO-3 each buffer is counted
  as DeepSpeed's stage3.py allocates it (:func:`zero3_buffers`): an fp32 model's master
  partition is its parameter partition (no copy), and the fp32 gradients are held for one
  optimizer sub-group (``sub_group_size``, 1e9) at a time; its ZeRO-3 estimator counts
  4 x the largest layer + 18P/N (fp32 gradients for every parameter, no 16-bit parameter
  partition): for Llama-2-7b in bf16 ours is 7 % below it on one device and 12 % above on 8
  with the buffers (tests/shared/test_plan.py).
- **buffers** (DeepSpeed, ZeRO-1/2/3): the gradient reduce bucket (``reduce_bucket_size``,
  5e8 elements, touched up to the trainable parameters) and, at ZeRO-3 over several ranks,
  the gathered full parameters of the running model (``stage3_max_live_parameters``: 3e7 for
  the trained models as DeepSpeed-Chat sets it, DeepSpeed's 1e9 for the frozen ones) beside
  their partitions; on one rank ZeRO-3 gathers nothing (the full parameter is a view of its
  partition). The rollout gathers the whole actor (``torch_rlhf.generation``), counted in
  the generation phase. :func:`zero3_buffers` names each ZeRO-3 buffer with its DeepSpeed
  source.
- **activations** of one training micro-batch, per layer: ``34 s b h`` bytes at 2-byte
  activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2 without
  its ``5 a s^2 b`` attention-score term: SDPA / flash attention never stores the scores),
  scaled by dtype bytes / 2; with gradient checkpointing only each layer's input,
  ``2 s b h``, plus one layer's full set during its recomputation. Plus the micro-batch's
  logits ``[b, s, V]`` in fp32 and their log-softmax (the LM head's output dominates small
  models).
- **KV cache** of the rollout (actor): ``layers x 2 x B x (prompt + answer) x kv_heads x
  head_dim x dtype bytes``.
- **scoring logits**: the actor's and reference's log-probabilities of the rollout take a
  ``[B, s, V]`` fp32 logits tensor and its log-softmax, one model at a time: often the
  largest single item.

Phases: ``generation`` (every resident state + KV cache), ``scoring`` (+ scoring logits),
``training`` (+ the larger of the actor's and critic's step working set); the peak is the
largest. The verdict compares it with ``device_memory_gib`` less ``headroom`` (allocator
fragmentation, CUDA context, communication buffers: 10 % by default). On a CPU run device
and host are one process, whose resident memory is :data:`BASELINE_RSS_BYTES` (the
framework's own, measured), plus :data:`ZERO3_IMPORT_RSS_BYTES` when a torch model runs at
ZeRO-3, plus both. It does not count what the C allocator keeps after a free (glibc's arenas
and heap; docs/plan.md measures it at ZeRO-3).

DeepSpeed-Chat's rule of thumb (its README, "Supported models"): a step-3 run fits when actor
+ critic parameters, in billions, are at most GPU memory in GB / 6.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.critic_free import models_used
from shared.model_size import ModelShape, load_hf_config, model_shape

__all__ = ["BASELINE_RSS_BYTES", "DEEPSPEED_ZERO", "ZERO3_IMPORT_RSS_BYTES", "Plan", "estimate",
           "model_shapes", "plan_config", "zero3_buffers"]

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BASELINE_RSS_BYTES = {"torch": 438 * 2**20, "jax": 256 * 2**20}
"""Resident memory of a PPO process whose models weigh nothing, measured (max RSS, 2-core
CPU box): torch: a whole PPO iteration of the torch backend on ``bench``'s ``micro`` model
(0.03M parameters; ``python -m bench.cost_curves``, its first row), i.e. torch + DeepSpeed,
the process group, four engines, tokenizer and allocator pools (278 MiB of it is importing
torch + DeepSpeed alone); jax: JAX + flax + the backend imported and the CPU runtime started
(256 MiB; not yet re-measured on a whole JAX iteration)."""
ZERO3_IMPORT_RSS_BYTES = {"torch": 45 * 2**20, "jax": 0}
"""A CPU process's extra resident memory once a ZeRO-3 engine exists, whatever the model:
DeepSpeed's ZeRO-3 parameter hooks (``runtime/zero/parameter_offload.py``, decorated
``torch.compiler.disable``; ``runtime/compiler.py``) import ``torch._dynamo`` on the first
engine: 563 more modules (networkx, sympy, functorch), 38.6 MiB of Python objects (tracemalloc
over ``deepspeed.initialize``). Measured: ``bench``'s ``micro`` PPO iteration, 484 MiB max RSS
at ZeRO-3 against 439 at ZeRO-0 (docs/plan.md)."""
_ITEMS = ("weights", "gradients", "optimizer", "buffers", "activations", "kv_cache", "logits")
DEEPSPEED_ZERO = {
    # DeepSpeed's default (runtime/zero/config.py); torch_rlhf.deepspeed_config sets none
    "reduce_bucket_size": 500_000_000,
    "sub_group_size": 1_000_000_000,
    # torch_rlhf.deepspeed_config: make_ds_config sets DS-Chat's 3e7 for the trained models;
    # make_eval_ds_config leaves DeepSpeed's 1e9 for the frozen ones
    "stage3_max_live_parameters": {"trained": 30_000_000, "frozen": 1_000_000_000},
}
"""The ZeRO settings the planner's buffers depend on, as the torch backend's DeepSpeed
configs produce them (``tests/shared/test_plan_zero3.py`` checks them against
``make_ds_config`` / ``make_eval_ds_config`` and DeepSpeed's defaults)."""


def zero3_buffers(*, params: int, trainable: int, width: int, world_size: int,
                  trained: bool, offload: bool) -> dict[str, int]:
    """Bytes of one model's ZeRO-3 state on one rank, per DeepSpeed buffer (0.19,
    ``runtime/zero/stage3.py`` ``DeepSpeedZeroOptimizer_Stage3``, ``partition_parameters.py``).

    - ``lp_param_buffer``: the rank's partition of the 16/32-bit parameters, ``P w / N``
      (``_create_fp16_partitions_with_defragmentation``, each ``ds_tensor`` a view into it;
      a frozen model keeps one ``ds_tensor`` per parameter, ``_partition_param``).
    - ``grad_partitions_flat_buffer``: the partitioned gradients, ``T w / N``
      (``_setup_for_real_optimizer``; ``gradient_accumulation_dtype`` is the model's dtype,
      ``engine.get_data_types``).
    - ``fp32_partitioned_groups_flat``: the fp32 master partition, ``4 T / N``; none when the
      model is fp32 on the device, where it *is* the ``lp_param_buffer``
      (``_create_fp32_partitions``).
    - ``fp32_gradient_buffer``: the fp32 gradients of the sub-group being stepped, ``4 x
      min(T / N, sub_group_size)`` (``initialize_optimizer_states``' ``gradient_buffer``;
      with offload one per sub-group, ``4 T / N`` on the host).
    - ``adam_states``: ``exp_avg`` and ``exp_avg_sq``, ``8 T / N``.
    - ``ipg_bucket``: ``ipg_buckets[dtype].buffer``, ``torch.empty(reduce_bucket_size)``
      filled with full (unpartitioned) gradients before each reduce-scatter: touched up to
      ``min(reduce_bucket_size, T) w``.
    - ``gathered_params``: the full parameters fetched for a forward / backward, at most
      ``stage3_max_live_parameters`` live: ``min(P, live) w``; 0 on one rank, where
      ``_no_gather_coalesced`` makes each full parameter a view of its partition.
    """
    n = world_size
    live = DEEPSPEED_ZERO["stage3_max_live_parameters"]["trained" if trained else "frozen"]
    out = {"lp_param_buffer": params * width // n,
           "gathered_params": 0 if n == 1 else min(params, live) * width}
    if trained:
        out["grad_partitions_flat_buffer"] = trainable * width // n
        out["fp32_partitioned_groups_flat"] = 0 if width == 4 and not offload else (
            4 * trainable // n)
        out["fp32_gradient_buffer"] = 4 * (trainable // n if offload else min(
            trainable // n, DEEPSPEED_ZERO["sub_group_size"]))
        out["adam_states"] = 8 * trainable // n
        out["ipg_bucket"] = min(DEEPSPEED_ZERO["reduce_bucket_size"], trainable) * width
    return out


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """One model's bytes, per item, on the device and on the host."""

    name: str
    params: int
    trainable: int
    device: dict[str, int]
    host: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The estimate of one config: per model, per phase, and the verdict."""

    world_size: int
    device_memory_gib: float
    headroom: float
    models: tuple[ModelMemory, ...]
    phases: dict[str, int]
    """Device bytes at the peak of each phase."""
    host_bytes: int
    backend: str
    zero3: bool = False
    """A model runs at ZeRO-3 (the process pays :data:`ZERO3_IMPORT_RSS_BYTES`)."""

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_gib * GIB * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def process_rss_bytes(self) -> int:
        """A CPU run's peak resident memory: baseline (+ ZeRO-3's imports) + device peak +
        host."""
        extra = ZERO3_IMPORT_RSS_BYTES[self.backend] if self.zero3 else 0
        return BASELINE_RSS_BYTES[self.backend] + extra + self.peak_bytes + self.host_bytes

    def rule_of_thumb(self) -> dict[str, Any]:
        """DeepSpeed-Chat's "actor + critic (billions) <= GPU GB / 6"."""
        billions = sum(m.params for m in self.models if m.name in ("actor", "critic")) / 1e9
        limit = self.device_memory_gib * GIB / 1e9 / 6
        return {"actor_critic_billions": billions, "limit_billions": limit,
                "fits": billions <= limit}

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "device_memory_gib": self.device_memory_gib,
                "headroom": self.headroom, "backend": self.backend,
                "models": [dataclasses.asdict(m) for m in self.models],
                "phases": self.phases, "peak_phase": self.peak_phase,
                "peak_bytes": self.peak_bytes, "usable_bytes": self.usable_bytes,
                "host_bytes": self.host_bytes, "fits": self.fits, "zero3": self.zero3,
                "process_rss_bytes": self.process_rss_bytes,
                "rule_of_thumb": self.rule_of_thumb()}


def model_shapes(config: Any) -> dict[str, ModelShape]:
    """Actor/reference and critic/reward shapes from ``model.actor_config`` /
    ``critic_config`` or the ``config.json`` of the local directories the config names
    (the critic falls back to the actor's base, as ``ModelConfig.reward_model_source``)."""
    model = config.model
    actor = model.actor_config or load_hf_config(model.actor_model_name_or_path)
    if model.critic_model_name_or_path is not None:
        critic = load_hf_config(model.critic_model_name_or_path)
    else:
        critic = model.critic_config or actor
    return {"lm": model_shape(actor), "value": model_shape(critic, value_head=True)}


def _activations(shape: ModelShape, *, rows: int, seq: int, act_bytes: int,
                 checkpointing: bool) -> int:
    per_layer_full = 34 * seq * rows * shape.hidden * act_bytes // 2
    if checkpointing:
        body = shape.layers * seq * rows * shape.hidden * act_bytes + per_layer_full
    else:
        body = shape.layers * per_layer_full
    return body


def _logits(shape: ModelShape, *, rows: int, seq: int) -> int:
    if shape.value_head:
        return 0
    return 2 * rows * seq * shape.vocab * 4  # fp32 logits and their log-softmax


def estimate(shapes: dict[str, ModelShape], *, models: tuple[str, ...], dtype: str,
             world_size: int, actor_zero_stage: int, critic_zero_stage: int, offload: bool,
             offload_reference: bool, generation_batch: int, training_batch: int,
             prompt_len: int, answer_len: int, actor_lora: tuple[int, tuple[str, ...], bool],
             critic_lora: tuple[int, tuple[str, ...], bool], actor_checkpointing: bool,
             critic_checkpointing: bool, device_memory_gib: float, headroom: float = 0.1,
             backend: str = "torch") -> Plan:
    """The :class:`Plan` of a PPO run; ``*_lora``: ``(dim, target_modules, only_optimize)``;
    ``models``: ``shared.critic_free.models_used`` (served ``name@url`` roles are skipped)."""
    width = DTYPE_BYTES[dtype]
    seq = prompt_len + answer_len
    out, work = [], {}
    rollout_gather, zero3 = 0, False
    for name in models:
        if "@" in name or name == "reward_fn":
            continue
        shape = shapes["lm" if name in ("actor", "reference") else "value"]
        trained = name in ("actor", "critic")
        # The reference and reward model run at ZeRO-3 beside a ZeRO-3 actor / critic
        # (DeepSpeed-Chat's _init_ref / _init_reward), else as full copies.
        stage = actor_zero_stage if name in ("actor", "reference") else critic_zero_stage
        stage = stage if trained or stage == 3 else 0
        lora_dim, targets, only = {"actor": actor_lora, "critic": critic_lora}.get(
            name, (0, (), False))
        adapters = shape.lora_params(lora_dim, targets) if trained and lora_dim else 0
        params = shape.params + adapters
        trainable = 0
        if trained:
            trainable = adapters + (shape.hidden if shape.value_head else 0) if only else params
        device = dict.fromkeys(_ITEMS, 0)
        host = dict.fromkeys(_ITEMS, 0)
        zero3 = zero3 or stage == 3
        weights_host = (offload and stage == 3) or (name == "reference" and offload_reference)
        if stage == 3:
            z3 = zero3_buffers(params=params, trainable=trainable, width=width,
                               world_size=world_size, trained=trained, offload=offload)
            (host if weights_host else device)["weights"] = z3["lp_param_buffer"]
            device["buffers"] = z3["gathered_params"] + z3.get("ipg_bucket", 0)
            if name == "actor" and world_size > 1:
                # torch_rlhf.generation gathers the whole actor for the rollout
                rollout_gather = params * width - z3["gathered_params"]
        else:
            (host if weights_host else device)["weights"] = params * width
        if trained and stage == 3:
            (host if offload else device)["gradients"] = z3["grad_partitions_flat_buffer"]
            (host if offload else device)["optimizer"] = (
                z3["fp32_partitioned_groups_flat"] + z3["fp32_gradient_buffer"]
                + z3["adam_states"])
        elif trained:
            gradients = trainable * width // (world_size if stage >= 2 else 1)
            # DeepSpeed's offload_optimizer moves the gradient partitions with the states.
            (host if offload and stage >= 1 else device)["gradients"] = gradients
            master = 4 if width < 4 or stage >= 1 else 0
            grads32 = 4 if width < 4 and stage >= 1 else 0
            optimizer = trainable * (8 + master + grads32)
            optimizer //= world_size if stage >= 1 else 1
            (host if offload else device)["optimizer"] = optimizer
        if trained:
            checkpointing = actor_checkpointing if name == "actor" else critic_checkpointing
            work[name] = (_activations(shape, rows=training_batch, seq=seq, act_bytes=width,
                                       checkpointing=checkpointing)
                          + _logits(shape, rows=training_batch, seq=seq))
            device["activations"] = work[name]
        if trained and stage in (1, 2):
            # stage_1_and_2.py setup_buckets: with contiguous_gradients (DeepSpeed's default)
            # ZeRO-1 and -2 copy each gradient into a reduce_bucket_size bucket, touched up to T
            device["buffers"] += min(DEEPSPEED_ZERO["reduce_bucket_size"], trainable) * width
        if name == "actor":
            device["kv_cache"] = (shape.layers * 2 * generation_batch * seq * shape.kv_heads
                                  * shape.head_dim * width)
            device["logits"] = _logits(shape, rows=generation_batch, seq=seq)
        out.append(ModelMemory(name=name, params=params, trainable=trainable, device=device,
                               host=host))
    resident = sum(m.device[k] for m in out
                   for k in ("weights", "gradients", "optimizer", "buffers"))
    actor = next((m for m in out if m.name == "actor"), None)
    phases = {"generation": resident + (actor.device["kv_cache"] if actor else 0)
              + rollout_gather,
              "scoring": resident + (actor.device["logits"] if actor else 0),
              "training": resident + max(work.values(), default=0)}
    host = sum(sum(m.host.values()) for m in out)
    return Plan(world_size=world_size, device_memory_gib=device_memory_gib, headroom=headroom,
                models=tuple(out), phases=phases, host_bytes=host, backend=backend,
                zero3=zero3 and backend == "torch")


def plan_config(config: Any, *, world_size: int = 1, device_memory_gib: float = 80.0,
                headroom: float = 0.1) -> Plan:
    """:func:`estimate` with every setting read from an ``RLHFConfig``."""
    ppo, torch_engine, data = config.ppo, config.engine.torch, config.data

    def lora(module) -> tuple[int, tuple[str, ...], bool]:
        return (module.lora.dim, tuple(module.lora.target_modules), module.lora.only_optimize)

    jax = config.backend == "jax"
    return estimate(
        model_shapes(config), models=models_used(config), dtype=config.model.dtype,
        world_size=world_size,
        # The JAX backend shards parameters and optimiser state over its fsdp axis: ZeRO-3.
        actor_zero_stage=3 if jax and config.engine.jax.mesh.fsdp > 1
        else torch_engine.actor_zero_stage,
        critic_zero_stage=3 if jax and config.engine.jax.mesh.fsdp > 1
        else torch_engine.critic_zero_stage,
        offload=torch_engine.offload and not jax,
        offload_reference=ppo.offload_reference_model and not jax,
        generation_batch=ppo.per_device_generation_batch_size,  # rows, n samples included
        training_batch=ppo.per_device_training_batch_size,
        prompt_len=data.max_prompt_seq_len, answer_len=data.max_answer_seq_len,
        actor_lora=lora(ppo.actor), critic_lora=lora(ppo.critic),
        actor_checkpointing=ppo.actor.gradient_checkpointing,
        critic_checkpointing=ppo.critic.gradient_checkpointing,
        device_memory_gib=device_memory_gib, headroom=headroom, backend=config.backend)
