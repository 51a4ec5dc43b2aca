"""Declarative Hugging Face <-> NNX parameter maps: the only thing a new family has to write.

A family declares a tuple of `Rule`s: an HF key template, one or more of our parameter-path
templates and a `Transform` between the two layouts. `{i}` in a template is the layer index.
Rules whose parameter does not exist in a given configuration (a disabled bias, an untied head)
are simply inactive; `convert.py` then reports any HF key left unused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of inverse functions between one HF tensor and our tensor(s) (numpy arrays).

    `to_ours(x, shapes)` also receives the shapes of our target parameters, which a split of
    unequal parts (Phi-3's fused q/k/v under grouped-query attention) needs."""

    name: str
    to_ours: Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], np.ndarray]


IDENTITY = Transform("identity", lambda x, shapes: [x], lambda xs: xs[0])
"""Same layout: embeddings, norms, biases, and GPT-2 `Conv1D` kernels (already `[in, out]`)."""

TRANSPOSE = Transform("transpose", lambda x, shapes: [x.T], lambda xs: xs[0].T)
"""`torch.nn.Linear.weight` `[out, in]` <-> `nnx.Linear.kernel` `[in, out]`."""

SPLIT_QKV = Transform(
    "split_qkv",
    lambda x, shapes: np.split(x, 3, axis=-1),
    lambda xs: np.concatenate(xs, axis=-1),
)
"""GPT-2's fused `c_attn` (`Conv1D` weight `[H, 3H]`, bias `[3H]`) <-> separate q, k, v."""


def _split_rows(x: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    bounds = np.cumsum([shape[-1] for shape in shapes])[:-1]
    return [part.T for part in np.split(x, bounds, axis=0)]


SPLIT_FUSED_LINEAR = Transform(
    "split_fused_linear",
    _split_rows,
    lambda xs: np.concatenate([x.T for x in xs], axis=0),
)
"""A fused `torch.nn.Linear.weight` `[out_1 + out_2 + ..., in]` (outputs concatenated in
order: Phi-3's `qkv_proj`, `gate_up_proj`) <-> separate kernels `[in, out_k]`."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF key template -> our parameter path template(s) under the backbone, with a transform."""

    hf: str
    ours: str | tuple[str, ...]
    transform: Transform = IDENTITY

    def expand(self, num_layers: int, *, hf_prefix: str, ours_prefix: str) -> list[Rule]:
        """Concrete rules with `{i}` filled in and the prefixes prepended."""
        ours = (self.ours,) if isinstance(self.ours, str) else self.ours
        indices = range(num_layers) if "{i}" in self.hf else [None]
        return [
            Rule(
                hf_prefix + self.hf.format(i=i),
                tuple(ours_prefix + path.format(i=i) for path in ours),
                self.transform,
            )
            for i in indices
        ]


def linear(hf: str, ours: str) -> tuple[Rule, Rule]:
    """A `torch.nn.Linear` (`weight` `[out, in]`, `bias`) <-> `nnx.Linear` (`kernel`, `bias`)."""
    return Rule(f"{hf}.weight", f"{ours}.kernel", TRANSPOSE), Rule(f"{hf}.bias", f"{ours}.bias")


def conv1d(hf: str, ours: str) -> tuple[Rule, Rule]:
    """A GPT-2 `Conv1D` (weight already `[in, out]`) <-> `nnx.Linear`."""
    return Rule(f"{hf}.weight", f"{ours}.kernel"), Rule(f"{hf}.bias", f"{ours}.bias")


def norm(hf: str, ours: str) -> tuple[Rule, Rule]:
    """An HF norm (`weight`, `bias`) <-> our `RMSNorm`/`LayerNorm` (`scale`, `bias`)."""
    return Rule(f"{hf}.weight", f"{ours}.scale"), Rule(f"{hf}.bias", f"{ours}.bias")


def embed(hf: str, ours: str) -> tuple[Rule]:
    """An `nn.Embedding` weight `[V, D]` <-> `nnx.Embed.embedding` `[V, D]`."""
    return (Rule(f"{hf}.weight", f"{ours}.embedding"),)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """Everything the converter needs to know about one family."""

    backbone: type
    """The `Backbone` subclass."""
    hf_prefix: str
    """Prefix of the backbone in HF `*ForCausalLM` state dicts ("model.", "transformer.")."""
    rules: tuple[Rule, ...]
    """Backbone rules, HF keys relative to `hf_prefix` (as HF's `AutoModel` names them) and our
    paths relative to the backbone."""
    ignored: tuple[str, ...] = ()
    """Regexes of HF keys that hold buffers, not parameters (old GPT-2 causal masks, ...)."""
