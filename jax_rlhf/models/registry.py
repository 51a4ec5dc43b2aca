"""The registry of model families: which module declares each one.

How to add a family (say `foo`, HF `model_type="foo"`):

1. Write `jax_rlhf/models/foo.py` with the backbone (a `decoder.Backbone` subclass), its key
   map (`key_map.FamilySpec`) and, last, `FAMILY = Family(name="foo", architectures={"foo":
   ("FooForCausalLM", "FooForSequenceClassification")}, from_hf=..., to_hf=..., spec=...,
   check=...)` (`family.py` documents each field). `from_hf` returns `ModelConfig` fields and
   raises `family.refuse(...)` for every HF option the backbone does not implement; `to_hf`
   is its inverse. A family may read several model types sharing one backbone and key map
   (`llama.py`: llama, mistral, qwen2); `ModelConfig.model_type` records which one to write.
2. If the family needs a new architecture option, add it to `ModelConfig` (`config.py`) as a
   documented field with a default that means "off", so no other family changes.
3. Add a test file `tests/jax/test_jax_foo.py` (or a case in `test_jax_families.py`).

Nothing else changes: a module of this package that assigns `FAMILY` at its top level is a
family module (`family_modules` finds it by reading the sources, importing nothing else), and
`ModelConfig.from_hf` / `to_hf`, the converter and the model classes look families up here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from pathlib import Path

from jax_rlhf.models.family import Family

_DECLARES_FAMILY = re.compile(r"^FAMILY\s*(?::[^=]*)?=", re.MULTILINE)


@functools.cache
def family_modules() -> tuple[str, ...]:
    """Names of the modules under `jax_rlhf.models` that each define one `FAMILY`, found by
    their source, sorted (the order error messages list the families in)."""
    package = Path(__file__).parent
    return tuple(sorted(
        info.name for info in pkgutil.iter_modules([str(package)])
        if not info.ispkg
        and _DECLARES_FAMILY.search((package / f"{info.name}.py").read_text(encoding="utf-8"))
    ))


@functools.cache
def families() -> dict[str, Family]:
    """`Family.name` -> `Family` of every registered family (imported on first use, so that
    family modules can import `config.py` without a cycle)."""
    found = {}
    for module in family_modules():
        family = importlib.import_module(f"jax_rlhf.models.{module}").FAMILY
        if family.name in found:
            raise ValueError(f"two families named {family.name!r}")
        found[family.name] = family
    return found


def family(name: str) -> Family:
    """The family called `name` (`ModelConfig.family`); `ValueError` listing the known ones."""
    registered = families()
    if name not in registered:
        raise ValueError(f"family={name!r} is not one of {tuple(registered)}")
    return registered[name]


def family_for_model_type(model_type: str) -> Family:
    """The family reading HF `model_type`; `ValueError` listing every supported model type."""
    for candidate in families().values():
        if model_type in candidate.architectures:
            return candidate
    supported = sorted(t for f in families().values() for t in f.model_types)
    raise ValueError(
        f"unsupported model_type {model_type!r} for the JAX backend; supported: {supported} "
        "(--backend torch runs any causal LM transformers has)"
    )
