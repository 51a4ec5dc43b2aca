"""Building blocks shared by the Llama, OPT and GPT-2 modules, numerically matched to HF torch.

Every projection is an `nnx.Linear` with a flat `[in, out]` kernel (HF stores `[out, in]`; the
converter transposes), so LoRA wrappers and path-based sharding rules apply to all families alike.
Normalisation statistics and the attention softmax are computed in float32 as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_rlhf.models.config import ModelConfig
from jax_rlhf.models.kv_cache import AttentionContext, window_mask, write_layer

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # HF "gelu_new" (GPT-2) and "gelu_pytorch_tanh" are both the tanh approximation.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

INIT_STDDEV = 0.02  # HF `initializer_range` default, used for fresh (non-converted) weights


def dense(
    cfg: ModelConfig, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs
) -> nnx.Linear:
    """`nnx.Linear` with the config's dtypes and HF-style normal(0.02) init."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.initializers.normal(INIT_STDDEV),
        rngs=rngs,
    )


def embedding(cfg: ModelConfig, num_embeddings: int, features: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """`nnx.Embed` (`embedding` param `[num_embeddings, features]`) with the config's dtypes."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.initializers.normal(INIT_STDDEV),
        rngs=rngs,
    )


def lookup_tokens(embed: nnx.Embed, input_ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """`embed(input_ids)`, except that lookups of `padding_idx` send no gradient back to the
    table, as `torch.nn.Embedding(padding_idx=...)` in HF Llama, Qwen2 and OPT."""
    x = embed(input_ids)  # [B, T, D]
    if padding_idx is None:
        return x
    is_pad = (input_ids == padding_idx)[..., None]
    return jnp.where(is_pad, jax.lax.stop_gradient(x), x)


def _feature_vector(param: nnx.Param, ndim: int) -> jax.Array:
    """A `[D]` parameter reshaped to `[1, ..., 1, D]` (rank promotion stays explicit)."""
    return param[...].reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
    """`scale * x / sqrt(mean(x^2) + eps)`, as `LlamaRMSNorm` (float32 statistics)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return (_feature_vector(self.scale, x.ndim) * normed).astype(self.dtype)


class LayerNorm(nnx.Module):
    """`(x - mean) / sqrt(var + eps) * scale + bias`, as `torch.nn.LayerNorm`."""

    def __init__(self, cfg: ModelConfig, dim: int):
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.dtype(cfg.param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(variance + self.eps)
        scale, bias = _feature_vector(self.scale, x.ndim), _feature_vector(self.bias, x.ndim)
        return (normed * scale + bias).astype(self.dtype)


def rope_inv_freq(
    *,
    rotary_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int | None = None,
    ext_factors: tuple[float, ...] | None = None,
) -> jax.Array:
    """RoPE inverse frequencies `[rotary_dim / 2]` (float32) as HF's `ROPE_INIT_FUNCTIONS`.

    - "default" / "linear": `theta ** -(2i / d)`, divided by `factor` (1 = no scaling).
    - "llama3" (`_compute_llama3_parameters`): wavelengths above
      `original_max / low_freq_factor` divided by `factor`, below `original_max /
      high_freq_factor` kept, in between interpolated smoothly.
    - "longrope": divided per frequency by `ext_factors` (Phi-3's short or long factors).
    """
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    if rope_type == "longrope":
        return 1.0 / (jnp.asarray(ext_factors, jnp.float32) * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if rope_type in ("default", "linear"):
        return inv_freq / factor if factor != 1.0 else inv_freq
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r} is not implemented")
    old_context = original_max_position_embeddings
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: jax.Array,
    *,
    head_dim: int,
    theta: float,
    dtype: jnp.dtype,
    factor: float = 1.0,
    inv_freq: jax.Array | None = None,
    attention_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """RoPE tables as `LlamaRotaryEmbedding`: `inv_freq` and angles in float32, cast at the end.

    Args:
      positions: `[B, T]` integer position ids.
      head_dim: the rotated width (`rotary_dim` under partial rotary, GPT-NeoX).
      factor: HF `rope_type="linear"` scaling, `inv_freq / factor` (1 = no scaling).
      inv_freq: `[head_dim / 2]` inverse frequencies (`rope_inv_freq`) replacing `theta`/`factor`.
      attention_scale: multiplies cos and sin (HF `attention_scaling`, longrope).
    Returns:
      cos, sin: `[B, T, head_dim]`, the two halves repeated (HF `cat((freqs, freqs))`).
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(rotary_dim=head_dim, theta=theta, factor=factor)
    freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_scale != 1.0:
        cos, sin = cos * attention_scale, sin * attention_scale
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """`[x1, x2] -> [-x2, x1]` on the last axis (HF's half-split convention, not interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin`; `cos`/`sin` must already broadcast to `x`'s rank.

    When `cos` is narrower than `x` (partial rotary, GPT-NeoX `rotary_pct`), only the first
    `cos.shape[-1]` features rotate and the rest pass through, as HF `apply_rotary_pos_emb`.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return jnp.concatenate([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query heads, optional RoPE and a KV cache.

    Query head `h` reads key/value head `h // (num_heads // num_kv_heads)` (HF `repeat_kv`).
    The keyword options default to plain Llama attention; each names the family that needs it:

    - `sliding_window` W: a query sees only the last W key slots, itself included (HF
      `sliding_window_overlay`, counted in cache slots as HF counts them; Mistral, Qwen2,
      Gemma 2/3 local layers).
    - `scale`: score scale instead of `head_dim**-0.5` (Gemma 2/3 `query_pre_attn_scalar**-0.5`).
    - `logit_softcap` c: scores become `c * tanh(scores / c)` before masking (Gemma 2).
    - `qk_norm`: a norm class `(cfg, head_dim)` applied per head to queries and keys before
      RoPE, as `q_norm` / `k_norm` (Gemma 3, Qwen3).
    - `rope_theta`, `rope_factor`, `rotary_dim`: RoPE base (default `cfg.rope_theta`), scaling
      factor (default `cfg.rope_factor`), and the rotated width (default `cfg.rotary_dim` or
      `head_dim`). The RoPE type and its other parameters come from `cfg` (`rope_inv_freq`);
      "longrope" switches to the long factors when a call's largest position reaches
      `rope_original_max_position_embeddings`, as HF's `longrope_frequency_update`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        use_rope: bool,
        rngs: nnx.Rngs,
        sliding_window: int | None = None,
        scale: float | None = None,
        logit_softcap: float | None = None,
        qk_norm: Callable[[ModelConfig, int], nnx.Module] | None = None,
        rope_theta: float | None = None,
        rope_factor: float | None = None,
        rotary_dim: int | None = None,
    ):
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = (rope_theta or cfg.rope_theta) if use_rope else None
        self.rope_factor = cfg.rope_factor if rope_factor is None else rope_factor
        self.rotary_dim = rotary_dim or cfg.rotary_dim or cfg.head_dim
        self.rope_config = cfg  # rope_type and its parameters (a static, hashable dataclass)
        self.sliding_window = sliding_window
        self.scale = cfg.head_dim**-0.5 if scale is None else scale
        self.logit_softcap = logit_softcap
        self.q_norm = qk_norm(cfg, cfg.head_dim) if qk_norm is not None else None
        self.k_norm = qk_norm(cfg, cfg.head_dim) if qk_norm is not None else None
        hidden = cfg.hidden_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = dense(cfg, hidden, q_dim, use_bias=cfg.attention_bias, rngs=rngs)
        self.k_proj = dense(cfg, hidden, kv_dim, use_bias=cfg.attention_bias, rngs=rngs)
        self.v_proj = dense(cfg, hidden, kv_dim, use_bias=cfg.attention_bias, rngs=rngs)
        self.o_proj = dense(cfg, q_dim, hidden, use_bias=cfg.attention_out_bias, rngs=rngs)

    def _rope_tables(self, positions: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[B, T, rotary_dim]` of `[B, T]` positions for this layer's RoPE."""
        cfg = self.rope_config
        kwargs = dict(
            rotary_dim=self.rotary_dim,
            theta=self.rope_theta,
            rope_type=cfg.rope_type,
            factor=self.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
        if cfg.rope_type != "longrope":
            inv_freq = rope_inv_freq(**kwargs)
            return rope_cos_sin(positions, head_dim=self.rotary_dim, theta=self.rope_theta,
                                dtype=dtype, inv_freq=inv_freq)
        short = rope_inv_freq(**kwargs, ext_factors=cfg.rope_short_factor)
        long = rope_inv_freq(**kwargs, ext_factors=cfg.rope_long_factor)
        # One table for the whole call, chosen by its longest sequence (HF's seq_len).
        use_long = jnp.max(positions) + 1 > cfg.rope_original_max_position_embeddings
        return rope_cos_sin(
            positions,
            head_dim=self.rotary_dim,
            theta=self.rope_theta,
            dtype=dtype,
            inv_freq=jnp.where(use_long, long, short),
            attention_scale=cfg.rope_attention_factor,
        )

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries `[B, T, K, G, D]`, keys and values `[B, T, K, D]` of `[B, T, H]` inputs
        (a family with fused projections, GPT-NeoX, overrides this)."""
        batch, length, _ = x.shape
        kv_heads, head_dim = self.num_kv_heads, self.head_dim
        groups = self.num_heads // kv_heads
        q = self.q_proj(x).reshape(batch, length, kv_heads, groups, head_dim)  # [B, T, K, G, D]
        k = self.k_proj(x).reshape(batch, length, kv_heads, head_dim)  # [B, T, K, D]
        v = self.v_proj(x).reshape(batch, length, kv_heads, head_dim)  # [B, T, K, D]
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        ctx: AttentionContext,
        layer_cache: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attends `[B, T, H]` inputs; returns `[B, T, H]` and this layer's (new) keys/values."""
        batch, length, _ = x.shape
        head_dim = self.head_dim
        q, k, v = self.project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            cos, sin = self._rope_tables(ctx.positions, x.dtype)  # [B, T, R]
            q = apply_rope(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
            k = apply_rope(k, cos[:, :, None, :], sin[:, :, None, :])
        if layer_cache is not None:
            k, v = write_layer(layer_cache, k, v, ctx.index)  # [B, S, K, D]

        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * self.scale  # [B, K, G, T, S]
        if self.logit_softcap is not None:
            scores = jnp.tanh(scores / self.logit_softcap) * self.logit_softcap
        allowed = ctx.allowed  # [B, T, S]
        if self.sliding_window is not None:
            allowed = allowed & window_mask(ctx, self.sliding_window)[None]
        scores = jnp.where(
            allowed[:, None, None, :, :],
            scores.astype(jnp.float32),
            jnp.finfo(jnp.float32).min,  # finite: fully padded query rows stay NaN-free
        )
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, K, G, D]
        out = out.reshape(batch, length, self.num_heads * head_dim)  # [B, T, N*D]
        return self.o_proj(out), (k, v)


class GatedMLP(nnx.Module):
    """`down(act(gate(x)) * up(x))`: Llama's SwiGLU when the activation is SiLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.activation = cfg.activation
        self.gate_proj = dense(cfg, hidden, inner, use_bias=cfg.mlp_bias, rngs=rngs)
        self.up_proj = dense(cfg, hidden, inner, use_bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = dense(cfg, inner, hidden, use_bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATION_FNS[self.activation]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
    """`down(act(up(x)))`: OPT's ReLU `fc1/fc2` and GPT-2's GELU `c_fc/c_proj`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.activation = cfg.activation
        self.up_proj = dense(cfg, hidden, inner, use_bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = dense(cfg, inner, hidden, use_bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATION_FNS[self.activation](self.up_proj(x)))
