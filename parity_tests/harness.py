"""The parity harness: tiny HF checkpoints, the same weights in both backends, comparisons as rows.

    path = build_checkpoint("llama_gqa_untied", tmp, kind="lm")     # an HF directory
    pair = load_pair(path, kind="lm")                               # torch + JAX on its weights
    rows = [compare("2", "logits", jax_out, torch_out, "logits", mask=real)]

Every model crosses between the backends only through a Hugging Face directory, exactly as the
trainers' outputs do: torch loads it with `torch_rlhf.models` (`build_causal_lm`,
`build_value_model`), JAX with `jax_rlhf.models` (`load_causal_lm`, `load_value_head_model`).
Gradients are compared under HF state-dict names: torch's `named_parameters()` and JAX's
gradients mapped through the converter's own key map (`to_state_dict`), so a gradient lands on
the tensor the weight came from.

The reference side of every comparison is torch (numpy at level 1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity_tests.tolerances import Tolerance, tolerance

__all__ = [
    "FAMILIES",
    "ModelPair",
    "Objective",
    "Row",
    "assert_passed",
    "build_checkpoint",
    "checkpoint_kind",
    "compare",
    "compare_grads",
    "format_table",
    "jax_forward",
    "jax_value_and_grad",
    "load_pair",
    "randomize_",
    "to_numpy",
    "torch_forward",
    "torch_value_and_grad",
]

# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared quantity: the largest differences and whether they are within tolerance."""

    level: str
    quantity: str
    max_abs_diff: float
    max_rel_diff: float
    tolerance: Tolerance
    passed: bool
    note: str = ""


def _leaf_diff(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max|a - b|, max|b|) over the entries; equal infinities count as equal, an infinity
    against a finite number (or a NaN anywhere) as an infinite difference."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0
    same = a == b  # equal infinities; NaN never equals anything
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite_b = np.abs(b[np.isfinite(b)])
    return float(diff.max()), float(finite_b.max()) if finite_b.size else 0.0


def compare(
    level: str,
    quantity: str,
    actual: Any,
    expected: Any,
    tol: str | Tolerance,
    *,
    mask: np.ndarray | None = None,
    note: str = "",
) -> Row:
    """Compare `actual` (JAX, or torch at level 1) with `expected` (the reference).

    Args:
      actual, expected: arrays of any backend (converted to numpy) of the same shape.
      tol: a `Tolerance` or its name in `parity_tests.tolerances`.
      mask: optional bool array broadcastable to the leading dims; only entries where it is
        True are compared (e.g. real tokens: logits at padding are meaningless).
    """
    tol = tolerance(tol) if isinstance(tol, str) else tol
    a, b = to_numpy(actual), to_numpy(expected)
    if a.shape != b.shape:
        return Row(level, quantity, float("inf"), float("inf"), tol, False,
                   f"shape {a.shape} != reference {b.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        m = np.broadcast_to(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a.shape)
        a, b = a[m], b[m]
    abs_diff, scale = _leaf_diff(a, b)
    rel_diff = abs_diff / scale if scale > 0 else (0.0 if abs_diff == 0 else float("inf"))
    passed = abs_diff <= tol.atol + tol.rtol * scale
    return Row(level, quantity, abs_diff, rel_diff, tol, bool(passed), note)


def compare_grads(
    level: str,
    quantity: str,
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tol: str | Tolerance = "grad",
) -> Row:
    """One row for all parameter gradients, keyed by HF state-dict name.

    Each tensor is checked on its own (max|a - b| <= atol + rtol * max|b| of that tensor).
    The row reports the largest absolute difference over all tensors, that difference
    relative to the largest gradient entry of any tensor (a per-tensor ratio would be
    dominated by tensors whose gradient is ~0, e.g. embedding rows of absent tokens), and
    names the worst tensor (the largest difference relative to what its tolerance allows).
    It fails if any tensor fails or the backends have gradients for different names.
    """
    tol = tolerance(tol) if isinstance(tol, str) else tol
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        return Row(level, quantity, float("inf"), float("inf"), tol, False,
                   f"names differ: only torch {missing[:4]}, only JAX {extra[:4]}")
    rows = {name: compare(level, name, actual[name], expected[name], tol) for name in expected}
    scales = {name: float(np.abs(expected[name]).max(initial=0.0)) for name in expected}

    def budget_used(name: str) -> float:
        allowed = tol.atol + tol.rtol * scales[name]
        return rows[name].max_abs_diff / allowed if allowed > 0 else float("inf")

    worst = max(rows, key=budget_used)
    failed = [name for name, r in rows.items() if not r.passed]
    note = f"{len(rows)} tensors; worst {worst}"
    if failed:
        note += f"; failing: {', '.join(failed[:4])}" + (" ..." if len(failed) > 4 else "")
    max_abs = max(r.max_abs_diff for r in rows.values())
    scale = max(scales.values(), default=0.0)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Row(level, quantity, max_abs, max_rel, tol, not failed, note)


def assert_passed(rows: list[Row]) -> None:
    """Raise AssertionError with the whole table unless every row passed (for tests)."""
    if not rows:
        raise AssertionError("nothing was compared")
    if not all(r.passed for r in rows):
        raise AssertionError("\n" + format_table(rows))


def format_table(rows: list[Row]) -> str:
    """A plain-text table: level, quantity, max abs diff, max rel diff, tolerance, pass/fail."""
    header = ("level", "quantity", "max abs diff", "max rel diff", "tolerance", "result")
    body = [
        (r.level, r.quantity, f"{r.max_abs_diff:.2e}", f"{r.max_rel_diff:.2e}", str(r.tolerance),
         ("pass" if r.passed else "FAIL") + (f"  ({r.note})" if r.note and not r.passed else ""))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        lines.append("  ".join([*cells, line[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    failed = sum(not r.passed for r in rows)
    summary = f"{len(rows) - failed}/{len(rows)} passed"
    lines.append(summary + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def to_numpy(x: Any) -> np.ndarray:
    """numpy copy of a numpy, torch or JAX array (or Python scalar)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- checkpoints

_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama_gqa_untied": dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, **_SPECIAL),
    "llama_gqa_tied": dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=True, **_SPECIAL),
    "opt_350m_shape": dict(
        model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
        do_layer_norm_before=False, **_SPECIAL),
    "gpt2": dict(
        model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        **_SPECIAL),
    "gpt_neox": dict(
        model_type="gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
        max_position_embeddings=64, **_SPECIAL),
    "gemma": dict(
        model_type="gemma", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, **_SPECIAL),
    "gemma2": dict(
        model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, max_position_embeddings=64, **_SPECIAL),
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=12,
        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=3.0, max_position_embeddings=64, **_SPECIAL),
    "llama3_rope": dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64), **_SPECIAL),
    "mistral_window": dict(
        model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        max_position_embeddings=64, **_SPECIAL),
    "qwen2_window": dict(
        model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        max_position_embeddings=64, **_SPECIAL),
    "qwen3": dict(
        model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=True, max_position_embeddings=64, **_SPECIAL),
    "phi3_partial_rotary": dict(
        model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        partial_rotary_factor=0.5, max_position_embeddings=64, **_SPECIAL),
}
"""HF config kwargs of the families DeepSpeed-Chat trains, in tiny sizes: Llama with grouped-query
attention (untied, and tied with a single KV head), OPT in the OPT-350m shape
(`word_embed_proj_dim` != `hidden_size`: project_in/out, post-LN blocks) and GPT-2 (fused qkv
`Conv1D`, tied head); and the JAX backend's newer families: GPT-NeoX (parallel residual,
partial rotary), Gemma, Gemma 2 and Gemma 3 text (local/global layers with a window of 4,
soft-capping, q/k norms), Llama 3 RoPE scaling, Mistral and Qwen2 with a window of 4, Qwen3
(q/k norms, free head_dim) and Phi-3 (fused projections, partial rotary)."""

WEIGHT_SCALE = 0.2
"""Std of the redrawn weights. HF's init (std 0.02) gives near-uniform logits on which a wrong
transpose or head order changes little; at 0.2 it changes outputs by O(1)."""


def randomize_(model: Any, *, seed: int, scale: float = WEIGHT_SCALE) -> None:
    """Redraw every parameter of a torch model in place: N(0, scale^2), plus 1 for the weights
    of norms (1-D `weight`), so that every layer contributes visibly; Gemma's norms scale by
    `1 + weight`, so theirs stay around 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)  # HF models and torch_rlhf's ValueModel have one
    centre = 0.0 if config is not None and config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            offset = centre if param.ndim == 1 and name.endswith("weight") else 0.0
            param.copy_(noise + offset)


def build_checkpoint(
    family_or_config: str | Mapping[str, Any],
    path: str | Path,
    *,
    kind: str = "lm",
    seed: int = 0,
    scale: float | None = WEIGHT_SCALE,
    tokenizer: Any = None,
) -> Path:
    """Build a random HF model with the torch backend's builders and save it to `path`.

    Args:
      family_or_config: a key of `FAMILIES` or HF config kwargs (`model_type` plus sizes).
      kind: "lm" (`AutoModelForCausalLM`) or "value" (`AutoModelForSequenceClassification`
        with `num_labels=1`: the reward model / critic).
      seed: seeds torch's init and the redraw.
      scale: redraw the weights at this std (see `WEIGHT_SCALE`); None keeps HF's init.
      tokenizer: saved alongside when given.
    """
    import torch

    from torch_rlhf.models import ValueModel, build_causal_lm, build_value_model

    config = FAMILIES[family_or_config] if isinstance(family_or_config, str) else family_or_config
    torch.manual_seed(seed)
    builder = {"lm": build_causal_lm, "value": build_value_model}[kind]
    model = builder(config_dict=dict(config))
    if scale is not None:
        randomize_(model, seed=seed, scale=scale)
    path = Path(path)
    hf_model = model.model if isinstance(model, ValueModel) else model
    hf_model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- model pairs


@dataclasses.dataclass
class ModelPair:
    """One HF checkpoint loaded by both backends (fp32, eval mode, no dropout)."""

    path: Path
    kind: str  # "lm" or "value"
    family: str  # jax_rlhf ModelConfig.family: llama, opt, gpt2
    torch: Any  # transformers PreTrainedModel (lm) or torch_rlhf.models.ValueModel (value)
    jax: Any  # jax_rlhf.models.CausalLM or ValueHeadModel

    @property
    def vocab_size(self) -> int:
        return int(self.jax.config.vocab_size)


def checkpoint_kind(path: str | Path) -> str:
    """"value" for an HF `*ForSequenceClassification` directory, else "lm"."""
    with open(Path(path) / "config.json") as f:
        architectures = json.load(f).get("architectures") or []
    return "value" if any("SequenceClassification" in a for a in architectures) else "lm"


def load_pair(path: str | Path, *, kind: str | None = None) -> ModelPair:
    """Load the HF directory `path` into both backends, in float32."""
    from jax_rlhf.models import load_causal_lm, load_value_head_model
    from torch_rlhf.models import build_causal_lm, build_value_model

    kind = kind or checkpoint_kind(path)
    if kind == "lm":
        torch_model = build_causal_lm(str(path), dtype="fp32")
        jax_model = load_causal_lm(path)
    elif kind == "value":
        torch_model = build_value_model(str(path), dtype="fp32")
        jax_model = load_value_head_model(path)
    else:
        raise ValueError(f"kind must be 'lm' or 'value', got {kind!r}")
    torch_model.eval()
    return ModelPair(Path(path), kind, jax_model.config.family, torch_model, jax_model)


# ----------------------------------------------------------------------------- backends

Objective = Callable[..., tuple[Any, dict[str, Any]]]
"""`objective(forward, batch, **static) -> (loss, aux)`: array-API code (see objectives.py)
that runs unchanged on torch tensors and, traced, on JAX arrays; `forward(ids, mask)` is the
model's logits [B, T, V] or values [B, T]."""


def to_torch(batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy -> torch: floats as float32, integers as int64, bools as bool."""
    import torch

    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            out[key] = torch.from_numpy(value.astype(np.float32))
        elif value.dtype.kind in "iu":
            out[key] = torch.from_numpy(value.astype(np.int64))
        else:
            out[key] = torch.from_numpy(value.copy())
    return out


def to_jax(batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy -> JAX: floats as float32, integers as int32, bools as bool."""
    import jax.numpy as jnp

    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind == "f":
            out[key] = jnp.asarray(value, dtype=jnp.float32)
        elif value.dtype.kind in "iu":
            out[key] = jnp.asarray(value, dtype=jnp.int32)
        else:
            out[key] = jnp.asarray(value)
    return out


def _torch_forward_fn(pair: ModelPair) -> Callable[[Any, Any], Any]:
    from torch_rlhf.models import causal_lm_logits

    if pair.kind == "lm":
        return lambda ids, mask: causal_lm_logits(pair.torch, ids, mask)
    return lambda ids, mask: pair.torch(ids, mask)


def torch_forward(pair: ModelPair, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] or values [B, T] of the torch model, as numpy."""
    import torch

    batch = to_torch({"ids": ids, "mask": mask})
    with torch.no_grad():
        return to_numpy(_torch_forward_fn(pair)(batch["ids"], batch["mask"]))


def torch_value_and_grad(
    pair: ModelPair, objective: Objective, batch: Mapping[str, np.ndarray], **static: Any
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, aux, grads) of `objective` on the torch model; grads keyed by HF names."""
    model = pair.torch
    model.zero_grad(set_to_none=True)
    loss, aux = objective(_torch_forward_fn(pair), to_torch(batch), **static)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = name.removeprefix("model.") if pair.kind == "value" else name  # ValueModel.model
        grads[key] = np.zeros(param.shape, np.float32) if param.grad is None else to_numpy(
            param.grad)
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), {k: to_numpy(v) for k, v in aux.items()}, grads


@functools.lru_cache(maxsize=64)
def _jax_forward_jit(graphdef: Any) -> Callable:
    import jax
    from flax import nnx

    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)[0]

    return jax.jit(forward)


def jax_forward(pair: ModelPair, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] or values [B, T] of the JAX model (jitted), as numpy."""
    from flax import nnx

    graphdef, state = nnx.split(pair.jax)
    batch = to_jax({"ids": ids, "mask": mask})
    return to_numpy(_jax_forward_jit(graphdef)(state, batch["ids"], batch["mask"]))


@functools.lru_cache(maxsize=64)
def _jax_grad_jit(graphdef: Any, objective: Objective, static: tuple) -> Callable:
    import jax
    from flax import nnx

    kwargs = dict(static)

    def loss_fn(state, batch):
        model = nnx.merge(graphdef, state)
        return objective(lambda ids, mask: model(ids, mask)[0], batch, **kwargs)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def jax_value_and_grad(
    pair: ModelPair, objective: Objective, batch: Mapping[str, np.ndarray], **static: Any
) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, aux, grads) of `objective` on the JAX model, jitted; grads mapped to HF names
    with the converter's `to_state_dict` (the same key map and transposes as the weights).

    One compilation per (model structure, objective, static kwargs, batch shapes): the left-
    and right-padded batches of one shape share it.
    """
    from flax import nnx

    from jax_rlhf.models import to_state_dict

    graphdef, state = nnx.split(pair.jax)
    fn = _jax_grad_jit(graphdef, objective, tuple(sorted(static.items())))
    (loss, aux), grads = fn(state, to_jax(batch))
    hf_grads = to_state_dict(nnx.merge(graphdef, grads))
    return float(loss), {k: to_numpy(v) for k, v in aux.items()}, hf_grads
