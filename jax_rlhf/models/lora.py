"""Low-rank adapters on the models' `nnx.Linear` layers, built on flax NNX's `nnx.LoRA`.

`apply_lora` swaps the selected layers for `LoRALinear`: the same `kernel`/`bias` at the same
parameter paths (so the converter, sharding rules and checkpoints still find them) plus an
`nnx.LoRA` adapter under `.lora` whose `lora_a [in, r]` / `lora_b [r, out]` are `nnx.LoRAParam`s:

    y = x W + b + (alpha / r) * x A B        (peft's `lora_alpha / r` scaling)

Layers are selected by their Hugging Face module names (`model.layers.0.self_attn.q_proj`,
`model.decoder.layers.0.fc1`, ...), exactly as DeepSpeed-Chat (`module_name` substring) and
peft (`target_modules` suffixes) select them in the torch backend. `merge_lora` folds the
adapters back into plain kernels for export.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf.models.convert import hf_parameter_names
from shared.lora_init import lora_a_init

LORA_MARKER = ".lora.lora_"
"""Substring of every adapter parameter's dotted path (`...q_proj.lora.lora_a`)."""


def is_lora_param(path: str) -> bool:
    """Whether the dotted parameter path names an adapter matrix."""
    return LORA_MARKER in path


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` whose output gets a scaled low-rank update from an `nnx.LoRA`."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        super().__init__(
            base.in_features,
            base.out_features,
            use_bias=base.use_bias,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            precision=base.precision,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )
        self.kernel = base.kernel  # adopt the base weights (no copy)
        if base.use_bias:
            self.bias = base.bias
        self.lora = nnx.LoRA(
            base.in_features,
            rank,
            base.out_features,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            # A as peft's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)); B zero, so the adapted
            # model starts equal to the base model.
            a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            rngs=rngs,
        )
        self.lora_scale = alpha / rank

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(x, out_sharding=out_sharding)
        return y + (self.lora(x) * self.lora_scale).astype(y.dtype)


def lora_targets(
    model: nnx.Module, *, module_name: str, target_modules: tuple[str, ...] = ()
) -> list[str]:
    """Dotted paths of the Linear layers to adapt, chosen by their HF module names.

    `target_modules` (peft): names equal to, or ending in `.` + , one of them; otherwise
    `module_name` (DeepSpeed-Chat): names containing that substring.
    """
    hf_names = hf_parameter_names(model)
    targets = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Linear) or isinstance(node, LoRALinear):
            continue
        ours = ".".join(str(p) for p in path)
        hf_key = hf_names.get(ours + ".kernel")
        if hf_key is None:
            continue
        hf_module = hf_key.rsplit(".", 1)[0]
        if target_modules:
            hit = any(hf_module == t or hf_module.endswith("." + t) for t in target_modules)
        else:
            hit = module_name in hf_module
        if hit:
            targets.append(ours)
    # HF modules that several of our kernels come from (Phi-3's qkv_proj, gate_up_proj)
    fused = Counter(v.rsplit(".", 1)[0] for k, v in hf_names.items() if k.endswith(".kernel"))
    shared = sorted({hf_names[t + ".kernel"].rsplit(".", 1)[0] for t in targets
                     if fused[hf_names[t + ".kernel"].rsplit(".", 1)[0]] > 1})
    if shared:
        raise ValueError(
            f"LoRA on {shared[0]}" + (f" (and {len(shared) - 1} more)" if len(shared) > 1 else "")
            + ": the JAX backend holds this fused Hugging Face layer as separate kernels "
            "(q/k/v, gate/up), and an adapter on each would train differently from peft's one "
            "adapter on the fused layer; leave it out of lora.target_modules / "
            "lora.module_name (e.g. target o_proj and down_proj) or run --backend torch")
    return targets


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    module_name: str,
    target_modules: tuple[str, ...] = (),
    rngs: nnx.Rngs,
    seed: int | None = None,
) -> list[str]:
    """Replaces the selected Linear layers of `model` (in place) by `LoRALinear`s.

    With `seed`, every A is `shared.lora_init.lora_a_init(seed, kind, HF module name)` (the
    torch backend's adapters); without, drawn from `rngs`.

    Returns the adapted layers' dotted paths. Raises ValueError when nothing matches, as peft
    does, rather than silently training nothing.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = lora_targets(model, module_name=module_name, target_modules=target_modules)
    if not targets:
        raise ValueError(
            f"LoRA: no Linear layer matches module_name={module_name!r} / "
            f"target_modules={list(target_modules)} (names are Hugging Face module names, e.g. "
            f"{sorted(set(k.rsplit('.', 1)[0] for k in hf_parameter_names(model).values()))[:4]})"
        )
    hf_names = hf_parameter_names(model)
    from jax_rlhf.models.causal_lm import ValueHeadModel

    kind = "value" if isinstance(model, ValueHeadModel) else "causal_lm"
    for target in targets:
        *parent_path, name = target.split(".")
        parent = model
        for part in parent_path:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        base = parent[int(name)] if name.isdigit() else getattr(parent, name)
        layer = LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs)
        if seed is not None:
            # A as the torch backend draws it: keyed by (seed, kind, HF module name)
            hf_module = hf_names[target + ".kernel"].rsplit(".", 1)[0]
            a = lora_a_init(seed, kind, hf_module, rank, base.in_features)
            layer.lora.lora_a[...] = jnp.asarray(a.T, layer.lora.lora_a[...].dtype)
        setattr(parent, name, layer)
    return targets


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A new model of the same class and config without adapters: W + (alpha / r) A B.

    A model without adapters is returned unchanged.
    """
    merged = {}
    found = False
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            found = True
            prefix = ".".join(str(p) for p in path)
            update = node.lora.lora_a[...] @ node.lora.lora_b[...]
            merged[prefix + ".kernel"] = node.kernel[...] + node.lora_scale * update
    if not found:
        return model
    values = {
        ".".join(str(p) for p in path): var[...]
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    values.update(merged)
    abstract = nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    new_state = nnx.from_flat_state(
        [
            (path, var.replace(jnp.asarray(values[".".join(str(p) for p in path)], var.dtype)))
            for path, var in nnx.to_flat_state(state)
        ]
    )
    return nnx.merge(graphdef, new_state)
