"""`Family`: everything about one model family, declared in that family's own module.

A family module (`llama.py`, `opt.py`, ...) ends with one `FAMILY = Family(...)` holding the
Hugging Face config conversion both ways, the HF class names, the backbone class and the key
map; `registry.py` lists the modules. `refuse` builds the error for an HF option the JAX
backend does not implement, so that every family words it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jax_rlhf.models.key_map import FamilySpec

if TYPE_CHECKING:
    from jax_rlhf.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One backbone architecture and the HF model types that describe it."""

    name: str
    """`ModelConfig.family` of the configs it builds ("llama", "opt", ...)."""
    architectures: dict[str, tuple[str, str]]
    """HF `model_type` it reads -> (causal-LM class, value-head `*ForSequenceClassification`
    class) in transformers. The first model type is the default of `ModelConfig.model_type`."""
    from_hf: Callable[[Any], dict[str, Any]]
    """`transformers` config -> `ModelConfig` fields (`family` included; vocabulary, tying and
    special tokens are read by `ModelConfig.from_hf`). Raises `refuse(...)` for any option the
    backbone does not implement: never silently ignore one."""
    to_hf: Callable[[ModelConfig, dict[str, Any]], Any]
    """`(cfg, common) -> transformers config`; `common` holds the keyword arguments every family
    shares (vocabulary, tying, special tokens, dtype, `num_labels`): pass them through.
    `ModelConfig.to_hf` sets `architectures` from the returned config's `model_type`."""
    spec: FamilySpec
    """Backbone class and HF <-> ours key map (`key_map.py`)."""
    check: Callable[[ModelConfig], None] | None = None
    """Validates a `ModelConfig` of this family (called from `ModelConfig.__post_init__`);
    raises `ValueError` for field combinations the backbone or `to_hf` cannot express."""

    @property
    def model_types(self) -> tuple[str, ...]:
        """HF model types this family reads and writes."""
        return tuple(self.architectures)


def refuse(model_type: str, option: str, value: Any, supported: str) -> ValueError:
    """The error for an HF option the JAX backend does not implement (raise it)."""
    return ValueError(
        f"{model_type}: {option}={value!r} is not supported by the JAX backend ({supported}); "
        "--backend torch runs this model"
    )


def require(hf_config: Any, name: str, expected: Any) -> None:
    """Refuses an HF option whose value differs from the only one the backbone implements."""
    value = getattr(hf_config, name, expected)
    if value != expected:
        raise refuse(hf_config.model_type, name, value, f"only {expected!r}")
