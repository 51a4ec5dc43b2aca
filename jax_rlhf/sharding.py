"""The device mesh, where every parameter and batch lives on it, and jit with those shardings.

Mesh axes (`engine.jax.mesh`, -1 = the remaining devices):

- `data`: batch sharded, parameters replicated (plain data parallelism);
- `fsdp`: batch sharded and parameters sharded along one dimension (ZeRO-3 style; XLA
  all-gathers the weights per use and reduce-scatters the gradients);
- `tensor`: the matmul dimension of attention heads / MLP width / vocabulary sharded
  (Megatron-style column- then row-parallel pairs).

Batches are sharded over `("data", "fsdp")` on their example axis. Parameters follow
`PARAM_RULES`, a table from path patterns to one mesh axis (or None) per dimension; a
dimension whose size the axis does not divide stays replicated, so any mesh runs any model.
Everything else (activations, collectives) is left to XLA's sharding propagation inside
`jax.jit` with these explicit `in_shardings` / `out_shardings`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
"""Mesh axes the example axis of every batch is split over."""

PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens\.embedding$", ("tensor", "fsdp")),  # [V, D]: vocab-parallel
    (r"embed_positions\.embedding$", (None, "fsdp")),  # [positions, D]
    # column-parallel; GPT-NeoX's fused query_key_value is heads-major, so it splits by heads
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|query_key_value)\.kernel$", ("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|query_key_value)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"lm_head\.kernel$", ("fsdp", "tensor")),  # [D, V]
    (r"(project_in|project_out|v_head)\.kernel$", ("fsdp", None)),
    (r"\.lora\.lora_a$", ("fsdp", None)),  # [in, r]
    (r"\.lora\.lora_b$", (None, None)),  # [r, out]
)
"""(regex on the dotted path, mesh axis per dimension); unmatched parameters (norms, row-
parallel biases) are replicated."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Axis sizes `(data, fsdp, tensor)` with the one -1 resolved to the remaining devices."""
    shape = [int(sizes[a]) for a in AXES]
    named = dict(zip(AXES, shape, strict=True))
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {named}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {named} needs {math.prod(shape)} devices, {num_devices} are "
                         "available")
    return tuple(shape)


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh from `engine.jax.mesh` (default: all data).

    `devices` defaults to every device of every process (`jax.devices()`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: getattr(mesh_config, a, -1 if a == "data" else 1) for a in AXES}
    shape = mesh_shape(sizes, len(devices))
    # Auto axes: shardings of intermediates are XLA's propagation (GSPMD), not types.
    axis_types = (AxisType.Auto,) * len(AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, devices=devices, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: `data * fsdp`."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _fit(spec: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with every axis that does not divide its dimension dropped."""
    spec = tuple(spec)[: len(shape)] + (None,) * max(0, len(shape) - len(spec))
    fitted = [
        axis if axis is not None and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1
        else None
        for axis, dim in zip(spec, shape, strict=True)
    ]
    return P(*fitted)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The `PartitionSpec` of the parameter at dotted path `name` (first matching rule)."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, name):
            return _fit(spec, shape, mesh)
    return P()


def param_shardings(params: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """`NamedSharding` of every parameter of a flat dict (arrays or shape structs)."""
    return {
        name: NamedSharding(mesh, param_spec(name, tuple(x.shape), mesh))
        for name, x in params.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, axis: int = 0) -> NamedSharding:
    """Arrays whose `axis` is the example axis, split over `("data", "fsdp")`."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def shard_like(tree: Any, shardings: Any) -> Any:
    """Places host or device arrays with the given shardings (works across processes).

    Every process passes the same global values, as all processes read the same data.
    """

    def put(x, sharding):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, *, axis: int = 0) -> dict:
    """Host arrays -> global device arrays split over `("data", "fsdp")` along `axis`.

    The size of `axis` must be a multiple of `data * fsdp`.
    """
    dp = data_parallel_size(mesh)
    for name, x in batch.items():
        if np.shape(x)[axis] % dp:
            raise ValueError(f"batch field {name!r}: {np.shape(x)[axis]} examples do not split "
                             f"over data x fsdp = {dp} devices")
    sharding = batch_sharding(mesh, axis=axis)
    return shard_like(dict(batch), {k: sharding for k in batch})


def tree_shardings(tree: Any) -> Any:
    """The `.sharding` of every array leaf: explicit in/out shardings for `jax.jit`."""
    return jax.tree.map(lambda x: x.sharding, tree)


def offload_supported() -> bool:
    """Whether parameters can live in pinned host memory between uses (GPU/TPU, not CPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return False
    return any(m.kind == "pinned_host" for m in device.addressable_memories())
