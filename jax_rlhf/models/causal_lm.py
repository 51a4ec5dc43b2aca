"""The common model interface: a family backbone under a language-model head or a value head.

Both models take `(input_ids [B, T], attention_mask [B, T], *, positions=None, cache=None)` and
return `(output, new_cache)`: logits `[B, T, V]` for `CausalLM`, values `[B, T]` for
`ValueHeadModel`. The backbone always lives at `.model`, so parameter paths, converter maps and
sharding rules are shared between the actor/reference (LM head) and the critic/reward (value head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf.models import registry
from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.decoder import Backbone
from jax_rlhf.models.kv_cache import KVCache
from jax_rlhf.models.layers import dense


def build_backbone(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Backbone:
    """The family's backbone (`LlamaModel`, `OPTModel`, `GPT2Model`, ...) for `cfg`."""
    return registry.family(cfg.family).spec.backbone(cfg, rngs=rngs)


class _WithBackbone(nnx.Module):
    config: ModelConfig
    model: Backbone

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, embed_dim]` (after OPT's `project_out`) and the cache."""
        return self.model(input_ids, attention_mask, positions=positions, cache=cache)

    def init_cache(self, batch_size: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty `KVCache` for `batch_size` rows of up to `max_len` tokens (prompt included).

        Refuses longrope (Phi-3 128k) caches longer than `rope_original_max_position_embeddings`:
        HF's `generate` recomputes the whole cache with the long factors when a sequence
        crosses that length, which a static cache does not reproduce.
        """
        cfg = self.config
        original = cfg.rope_original_max_position_embeddings
        if cfg.rope_type == "longrope" and max_len > original:
            raise ValueError(
                f"{cfg.model_type}: generating {max_len} slots with longrope RoPE is not "
                f"supported by the JAX backend beyond original_max_position_embeddings="
                f"{original} (HF recomputes the cache with the long factors there); shorten "
                "the prompt plus max_new_tokens, or --backend torch runs it"
            )
        return KVCache.init(
            batch_size=batch_size,
            max_len=max_len,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=jnp.dtype(dtype or cfg.dtype),
        )


class CausalLM(_WithBackbone):
    """Backbone + LM head (`lm_head`, or the token embedding when `tie_word_embeddings`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = build_backbone(cfg, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else dense(cfg, cfg.embed_dim, cfg.vocab_size, use_bias=False, rngs=rngs)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | slice = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Next-token logits `[B, T, V]` (in `config.dtype`) and the updated cache.

        See `Backbone.__call__` for the arguments; logits at padding positions are meaningless.
        `logits_to_keep` (HF's argument of that name) computes the LM head on some positions
        only: an int k > 0 the last k, `[B, k, V]` (a prefill needs just the last one); a
        static `slice` those positions (PPO needs the answer's). The head is a third of a
        small model's FLOPs.
        """
        hidden, cache = self.hidden_states(
            input_ids, attention_mask, positions=positions, cache=cache
        )  # [B, T, E]
        if isinstance(logits_to_keep, slice):
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)  # [B, T, V]
        else:
            logits = self.lm_head(hidden)  # [B, T, V]
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2/3, as HF's *ForCausalLM head
            logits = jnp.tanh(logits / cap) * cap
        return logits, cache


class ValueHeadModel(_WithBackbone):
    """Backbone + scalar head `v_head` (`Linear(embed_dim, 1)`, no bias): critic / reward model.

    The head is DeepSpeed-Chat's `RewardModel.v_head` and the torch backend's value head: a
    `[1, embed_dim]` weight on the backbone's last hidden states (after OPT's `project_out`),
    saved as HF `*ForSequenceClassification.score.weight`; see `convert.py`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = build_backbone(cfg, rngs=rngs)
        self.v_head = nnx.Linear(
            cfg.embed_dim,
            1,
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Per-token values `[B, T]` (in `config.dtype`) and the updated cache."""
        hidden, cache = self.hidden_states(
            input_ids, attention_mask, positions=positions, cache=cache
        )  # [B, T, E]
        return self.v_head(hidden)[..., 0], cache  # [B, T]
