"""Hugging Face checkpoints <-> our NNX models, driven by each family's declarative key map.

Import: the config becomes a `ModelConfig`, the model is built abstractly (`nnx.eval_shape`, no
random init), every HF tensor is converted by its `Rule` (in float32, so bf16 goes through
float32), checked against the abstract shape and cast to `param_dtype`. Every HF key must be used
and every parameter filled: otherwise `CheckpointMismatchError` lists the offenders.
Export writes `model.safetensors` + `config.json` that `AutoModelForCausalLM.from_pretrained` loads.

Accepted key spellings: HF `*ForCausalLM` / `*ForSequenceClassification` names
("model.layers.0...", "lm_head.weight", "score.weight"), HF base-model names without the backbone
prefix ("layers.0...", as `AutoModel` saves them), and DeepSpeed-Chat's `v_head.weight` for the
value head. `strip_prefix` removes a wrapper prefix first (DeepSpeed-Chat's reward model saves
its backbone under "rwtranrsformer.").
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_rlhf.models import registry
from jax_rlhf.models.causal_lm import CausalLM, ValueHeadModel
from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.key_map import TRANSPOSE, Rule
from shared.errors import InputError, ModelSourceError, is_hub_name, one_line

HEAD_RULES = (
    Rule("lm_head.weight", "lm_head.kernel", TRANSPOSE),
    Rule("score.weight", "v_head.kernel", TRANSPOSE),
)
"""Heads are the same for every family; the backbone sits at `.model` in both model classes.
The value head is saved as HF `*ForSequenceClassification.score` (`num_labels=1`, no bias), the
torch backend's layout; DeepSpeed-Chat's name for it is accepted on import (`HEAD_ALIASES`)."""

HEAD_ALIASES = {"v_head.weight": "score.weight", "embed_out.weight": "lm_head.weight"}
"""Other names of head tensors, renamed on import (DeepSpeed-Chat's value head; GPT-NeoX's LM
head as Pythia checkpoints name it, which transformers renames on load too)."""

ModelClass = type[CausalLM] | type[ValueHeadModel]


class CheckpointMismatchError(InputError):
    """A checkpoint does not fit the model: missing keys, unused keys or wrong shapes (an
    InputError, so also a ValueError)."""


def read_config(path: str | Path, **overrides) -> ModelConfig:
    """`ModelConfig` from `path/config.json`; `overrides` set e.g. `dtype`, `param_dtype`.

    Raises:
      ModelSourceError: `path` is not a directory (the JAX backend reads local directories).
      InputError: no `config.json`, invalid JSON, or a model type we do not build.
    """
    path = Path(path)
    if not path.is_dir():
        hint = ""
        if not path.exists() and is_hub_name(str(path)):
            hint = (" (the JAX backend reads local directories only; fetch a Hub model with "
                    f"`hf download {path} --local-dir DIR`)")
        state = "is not a directory" if path.exists() else "does not exist"
        raise ModelSourceError(f"model directory {path} {state}{hint}")
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        with open(file) as f:
            hf_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{file}: not a valid JSON config ({one_line(str(err))})") from err
    try:
        return ModelConfig.from_hf(hf_config, **overrides)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{file}: {one_line(str(err))}") from err


def read_hf_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an HF directory as float32 numpy arrays, keyed by their HF names.

    Reads `model.safetensors`, sharded `model.safetensors.index.json`, or (with torch)
    `pytorch_model.bin` / its sharded index, in that order of preference.
    """
    import torch

    path = Path(path)
    for weights, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / weights).exists():
            files = [path / weights]
        elif (path / index).exists():
            try:
                with open(path / index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as err:
                raise InputError(f"{path / index}: not a valid weight index "
                                 f"({type(err).__name__}: {one_line(str(err))})") from err
            files = [path / name for name in shards]
        else:
            continue
        tensors = {}
        for file in files:
            if not file.is_file():
                raise InputError(f"{file}: no such file (listed in {path / index})")
            try:
                if file.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    tensors.update(load_file(file))
                else:
                    tensors.update(torch.load(file, map_location="cpu", weights_only=True))
            except (OSError, MemoryError):
                raise
            except Exception as err:  # SafetensorError, UnpicklingError, torch's RuntimeError
                raise InputError(f"{file}: corrupt or unreadable weights file "
                                 f"({type(err).__name__}: {one_line(str(err), limit=300)})"
                                 ) from err
        # bf16 has no numpy dtype: go through float32 (exact), cast to param_dtype later.
        return {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or shards) in {path}")


def from_state_dict(
    model_cls: ModelClass,
    cfg: ModelConfig,
    state_dict: dict[str, np.ndarray],
    *,
    strip_prefix: str = "",
) -> CausalLM | ValueHeadModel:
    """Builds `model_cls(cfg)` with parameters taken from an HF-named `state_dict`.

    Raises:
      CheckpointMismatchError: listing HF keys the model needs but the state dict lacks, keys of
        the state dict nothing consumes, and tensors whose converted shape differs from the
        model's. `lm_head.weight` is dropped, not unused, when the model has no `lm_head`
        (tied embeddings, value-head models), as HF itself ties it away.
    """
    spec = registry.family(cfg.family).spec
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = _flat_params(state)
    state_dict = _canonical(state_dict, cfg, strip_prefix)

    values, missing, mismatched, consumed = {}, [], [], set()
    for rule in _active_rules(cfg, flat):
        if rule.hf not in state_dict:
            missing.append(rule.hf)
            continue
        consumed.add(rule.hf)
        shapes = [flat[path].shape for path in rule.ours]
        converted = rule.transform.to_ours(state_dict[rule.hf], shapes)
        for path, array in zip(rule.ours, converted, strict=True):
            expected = flat[path].shape
            if array.shape != expected:
                mismatched.append(f"{rule.hf} -> {path}: {array.shape} != {expected}")
            values[path] = array
    droppable = set() if "lm_head.kernel" in flat else {"lm_head.weight"}
    ignored = [re.compile(pattern) for pattern in spec.ignored]
    unused = sorted(
        key
        for key in state_dict
        if key not in consumed and key not in droppable and not any(p.search(key) for p in ignored)
    )
    if missing or unused or mismatched:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {model_cls.__name__} ({cfg.hf_model_type}):"
            + _listing("missing HF keys", missing)
            + _listing("unused HF keys", unused)
            + _listing("shape mismatches", mismatched)
        )
    new_state = nnx.from_flat_state(
        [
            (path, var.replace(jnp.asarray(values[_dotted(path)], dtype=var.dtype)))
            for path, var in nnx.to_flat_state(state)
        ]
    )
    return nnx.merge(graphdef, new_state)


def to_state_dict(model: CausalLM | ValueHeadModel) -> dict[str, np.ndarray]:
    """The model's parameters as an HF-named dict of float32 numpy arrays (`*ForCausalLM`
    names, or `*ForSequenceClassification` ones for a value-head model)."""
    flat = {
        path: np.array(var[...], dtype=np.float32)  # a writable host copy
        for path, var in _flat_params(nnx.state(model)).items()
    }
    return {
        rule.hf: rule.transform.to_hf([flat[path] for path in rule.ours])
        for rule in _active_rules(model.config, flat)
    }


def hf_parameter_names(model: CausalLM | ValueHeadModel) -> dict[str, str]:
    """Our dotted parameter path -> the HF key it is saved under (one entry per tensor we
    own; GPT-2's fused `c_attn` maps its q, k and v kernels to the same key)."""
    flat = _flat_params(nnx.state(model))
    return {path: rule.hf for rule in _active_rules(model.config, flat) for path in rule.ours}


def load_causal_lm(
    path: str | Path, *, dtype: str = "float32", param_dtype: str = "float32"
) -> CausalLM:
    """A `CausalLM` from an HF directory (`config.json` + weights)."""
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype)
    return from_state_dict(CausalLM, cfg, read_hf_state_dict(path))


def load_value_head_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    init_v_head: bool = False,
    seed: int = 0,
    strip_prefix: str = "",
) -> ValueHeadModel:
    """A `ValueHeadModel` from an HF directory with a value head (`score.weight` of an HF
    `*ForSequenceClassification` with `num_labels=1`, or DeepSpeed-Chat's `v_head.weight`).

    With `init_v_head`, a checkpoint without a value head (an SFT model starting reward
    training) gets a fresh head drawn like `torch.nn.Linear`'s default, U(+-1/sqrt(embed_dim)).
    """
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype)
    state_dict = read_hf_state_dict(path)
    if init_v_head and not {"score.weight", "v_head.weight"} & state_dict.keys():
        bound = 1.0 / np.sqrt(cfg.embed_dim)
        rng = np.random.default_rng(seed)
        head = rng.uniform(-bound, bound, (1, cfg.embed_dim)).astype(np.float32)
        state_dict["score.weight"] = head
    return from_state_dict(ValueHeadModel, cfg, state_dict, strip_prefix=strip_prefix)


def save_hf(model: CausalLM | ValueHeadModel, path: str | Path, *, dtype: str | None = None):
    """Writes `config.json` and `model.safetensors` (in `dtype`, default the param dtype).

    A `CausalLM` directory loads with `transformers.AutoModelForCausalLM.from_pretrained`, a
    `ValueHeadModel` one with `AutoModelForSequenceClassification` (`score.weight`, one label),
    which is also how the torch backend saves and loads reward models and critics.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.config.param_dtype
    tensors = {
        key: torch.from_numpy(np.ascontiguousarray(array)).to(getattr(torch, dtype))
        for key, array in to_state_dict(model).items()
    }
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    hf_config = model.config.replace(param_dtype=dtype).to_hf(
        value_head=isinstance(model, ValueHeadModel)
    )
    hf_config.save_pretrained(path)


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    flat = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            raise TypeError(f"{_dotted(path)} is a {type(var).__name__}, not an nnx.Param")
        flat[_dotted(path)] = var
    return flat


def _active_rules(cfg: ModelConfig, flat: dict) -> list[Rule]:
    """Concrete rules whose parameters exist; every parameter must be covered exactly once."""
    spec = registry.family(cfg.family).spec
    backbone = [
        r.expand(cfg.num_layers, hf_prefix=spec.hf_prefix, ours_prefix="model.") for r in spec.rules
    ]
    heads = [r.expand(0, hf_prefix="", ours_prefix="") for r in HEAD_RULES]
    rules = [concrete for expanded in backbone + heads for concrete in expanded]
    active = [rule for rule in rules if all(path in flat for path in rule.ours)]
    covered = [path for rule in active for path in rule.ours]
    uncovered = sorted(set(flat) - set(covered))
    doubled = sorted(path for path, n in collections.Counter(covered).items() if n > 1)
    if uncovered or doubled:
        raise ValueError(
            f"key map of {cfg.family!r} is incomplete: no rule for {uncovered}, "
            f"several rules for {doubled}"
        )
    return active


def _canonical(state_dict: dict, cfg: ModelConfig, strip_prefix: str) -> dict[str, np.ndarray]:
    """Renames keys to HF spelling: strips `strip_prefix`, renames `HEAD_ALIASES`, adds the
    backbone prefix to base-model keys ("layers.0..." -> "model.layers.0...")."""
    head_keys = {rule.hf for rule in HEAD_RULES}
    prefix = registry.family(cfg.family).spec.hf_prefix
    out = {}
    for key, value in state_dict.items():
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        key = HEAD_ALIASES.get(key, key)
        if key not in head_keys and not key.startswith(prefix):
            key = prefix + key
        if key in out:
            raise CheckpointMismatchError(f"two checkpoint keys map to {key!r}")
        out[key] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    return f"\n  {title} ({len(items)}): {items}" if items else ""
