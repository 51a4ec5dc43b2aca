"""The actor in another dtype for rollouts (``ppo.rollout_dtype``), as ``jax_rlhf.rollout_weights``.

With ``ppo.rollout_dtype: bfloat16`` the rollout sampler (:func:`torch_rlhf.generation.generate`)
runs on a bf16 copy of the actor module: bf16 weights, matmuls and KV cache; float32 sampling
and log-probs (``generate`` upcasts each step's logits before ``sample_token`` and
``log_softmax``). The copy is made once and its weights refreshed from the actor when the
trainer marks them stale (after each training step), so one cast per PPO iteration.

Not supported: ZeRO-3 (each rank holds a shard; the copy would need the gathered weights), and
the DeepSpeed Hybrid Engine (it generates from its own containers): bf16 rollouts take the
module path.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from torch_rlhf.models import unwrap_model

__all__ = ["RolloutModule"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RolloutModule:
    """The module rollouts run on: the actor itself, or a copy of it in ``dtype``.

    Args:
      dtype: ``ppo.rollout_dtype`` (None, "float32" or "bfloat16").
    """

    def __init__(self, dtype: str | None):
        if dtype not in (None, *_DTYPES):
            raise ValueError(f"rollout dtype {dtype!r}: must be None, float32 or bfloat16")
        self.dtype = None if dtype is None else _DTYPES[dtype]
        self._copy: nn.Module | None = None
        self._stale = True

    def uses_copy(self, actor: nn.Module) -> bool:
        """Whether rollouts run on a copy (the dtype differs from the actor's)."""
        if self.dtype is None:
            return False
        return next(unwrap_model(actor).parameters()).dtype != self.dtype

    def mark_stale(self) -> None:
        """The actor's weights changed (a training step, a restored checkpoint)."""
        self._stale = True

    def get(self, actor: nn.Module) -> nn.Module:
        """The module to generate with: ``actor`` itself when no cast is needed, else the
        copy, its weights re-cast from ``actor`` if they were marked stale."""
        if not self.uses_copy(actor):
            return actor
        module = unwrap_model(actor)
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            raise NotImplementedError(
                "ppo.rollout_dtype under ZeRO-3: the rollout copy needs the gathered weights; "
                "use actor_zero_stage <= 2 or rollout_dtype: null")
        if self._copy is None:
            self._copy = copy.deepcopy(module).to(self.dtype).eval()
            self._copy.requires_grad_(False)
            # buffers (RoPE's inv_freq) stay as the actor's: HF computes cos/sin in float32
            # and casts them to the activations' dtype, as the JAX layers do
            for name, buffer in module.named_buffers():
                self._copy.get_buffer(name).data = buffer.detach().clone()
        elif self._stale:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.state_dict().values(),
                                        module.state_dict().values(), strict=True):
                    mine.copy_(theirs)
        self._stale = False
        return self._copy
