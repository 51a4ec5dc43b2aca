"""The benchmark's models: Llama-style decoders at fixed sizes, random weights, HF directories.

Every workload loads the same Hugging Face directories, so the torch backend, the JAX backend
and plain Hugging Face ``generate`` run on identical weights (as ``parity_tests.harness``
does). Weights are Hugging Face's own init (std 0.02): near-uniform next-token
distributions, which is what a speed benchmark wants (no early EOS, full-length answers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "build_model_dirs", "param_counts"]

_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

SIZES: dict[str, dict[str, Any]] = {
    # ~10M parameters: the size of the demo's models scaled up to a real vocabulary.
    "tiny": dict(
        model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=704,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        **_SPECIAL),
    # ~100M parameters: Llama-2's vocabulary and head size (64), grouped-query attention.
    "small": dict(
        model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
        num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        **_SPECIAL),
    # Smoke-test size only (seconds per workload); not part of a default run.
    "micro": dict(
        model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
        **_SPECIAL),
}
"""Hugging Face config kwargs per benchmark size."""


def param_counts(hf_config: dict[str, Any], *, value_head: bool = False) -> dict[str, int]:
    """Parameter counts of a Llama config, analytically.

    Returns ``total`` (every parameter) and ``matmul`` (the parameters that multiply an
    activation: everything but the input embedding, which is a lookup; a tied embedding
    counts once, as the LM head). ``matmul`` is the N of the 6 * N * tokens FLOP estimate;
    ``head`` is the LM head's (or value head's) share of it.
    ``value_head``: the model is a reward model / critic (a 1-wide head instead of the LM
    head).
    """
    d, f = hf_config["hidden_size"], hf_config["intermediate_size"]
    v, layers = hf_config["vocab_size"], hf_config["num_hidden_layers"]
    heads, kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    head_dim = d // heads
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
    per_layer = attention + 3 * d * f + 2 * d  # q/o, k/v, gate/up/down, two RMSNorms
    body = layers * per_layer + d  # final norm
    embedding = v * d
    head = d if value_head else v * d
    tied = hf_config.get("tie_word_embeddings", False) and not value_head
    total = embedding + body + (0 if tied else head)
    return {"total": total, "matmul": body + head, "head": head}


def build_model_dirs(size: str, root: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Writes ``<root>/<size>/lm`` (causal LM: actor, reference, SFT) and ``.../value``
    (reward model / critic, same backbone shape) unless they exist; returns their paths."""
    from parity_tests.harness import build_checkpoint

    config = SIZES[size]
    base = Path(root) / size
    paths = {}
    for kind, offset in (("lm", 0), ("value", 1)):
        path = base / kind
        if not (path / "config.json").exists():
            build_checkpoint(config, path, kind=kind, seed=seed + offset, scale=None)
        paths[kind] = str(path)
    (base / "sizes.json").write_text(json.dumps(
        {"hf_config": config, "lm": param_counts(config),
         "value": param_counts(config, value_head=True)}, indent=1))
    return paths
