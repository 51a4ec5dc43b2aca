"""Backend-independent LoRA adapter initialisation.

Both backends draw every adapter's A matrix from `lora_a_init`, keyed by (seed, model kind,
Hugging Face module name), so the same config starts from the same adapters in torch and JAX:
peft's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)); B starts at zero.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["lora_a_init"]


def lora_a_init(seed: int, kind: str, module_name: str, rank: int,
                in_features: int) -> np.ndarray:
    """The `[rank, in_features]` float32 A matrix of the adapter on `module_name` (the HF
    module name, e.g. "model.layers.0.self_attn.q_proj") of a `kind` ("causal_lm" or
    "value") model."""
    digest = hashlib.sha256(f"{kind}:{module_name}".encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, *words])
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
