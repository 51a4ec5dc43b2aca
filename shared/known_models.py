"""The shapes of the hub models the shipped configs name, for ``rlhf plan`` offline.

``rlhf plan`` never downloads; a hub name whose ``config.json`` is neither a local directory
nor in the Hugging Face cache is looked up here: the size keys of the public ``config.json``
of each model (OPT: Zhang et al. 2022, table 1; Llama 2: Touvron et al. 2023, table 1 and
the released configs). Only the keys ``shared.model_size`` reads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KNOWN_CONFIGS"]


def _opt(d: int, f: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return dict(model_type="opt", hidden_size=d, ffn_dim=f, num_hidden_layers=layers,
                num_attention_heads=heads, vocab_size=50272, max_position_embeddings=2048,
                word_embed_proj_dim=d, do_layer_norm_before=True, **extra)


def _llama(d: int, f: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=d, intermediate_size=f,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-125m": _opt(768, 3072, 12, 12),
    "facebook/opt-350m": {**_opt(1024, 4096, 24, 16), "word_embed_proj_dim": 512,
                          "do_layer_norm_before": False},
    "facebook/opt-1.3b": _opt(2048, 8192, 24, 32),
    "facebook/opt-2.7b": _opt(2560, 10240, 32, 32),
    "facebook/opt-6.7b": _opt(4096, 16384, 32, 32),
    "facebook/opt-13b": _opt(5120, 20480, 40, 40),
    "facebook/opt-30b": _opt(7168, 28672, 48, 56),
    "facebook/opt-66b": _opt(9216, 36864, 64, 72),
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8),
}
"""Hub name -> the size keys of its ``config.json``."""
