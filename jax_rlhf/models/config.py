"""One frozen configuration for every decoder-only family, convertible to and from Hugging Face.

`ModelConfig.from_hf` reads a `transformers` config (object or `config.json` dict) through the
family that declares its `model_type` (`registry.py`), which rejects the options our modules do
not implement rather than silently ignoring them; `to_hf` builds the matching `transformers`
config so that exported checkpoints load with `AutoModelForCausalLM`. Options of one family
only are fields here too, defaulting to "off", so that one frozen config serves every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
"""HF `rope_parameters["rope_type"]` values the RoPE of `layers.py` implements."""
LAYER_TYPES = ("full_attention", "sliding_attention")
"""HF `layer_types` entries: global attention, or attention within `sliding_window`."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only causal LM; shared by the Llama, OPT and GPT-2 modules."""

    family: str
    """Which `registry.Family` builds the backbone ("llama", "opt", "gpt2", ...)."""
    vocab_size: int
    """Rows of the token embedding and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder blocks."""
    num_heads: int
    """Query heads per attention layer."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when < `num_heads`; must divide it)."""
    head_dim: int
    """Width of one attention head (Llama may set it independently of hidden/heads)."""
    intermediate_size: int
    """Hidden width of the MLP (OPT `ffn_dim`, GPT-2 `n_inner`)."""
    max_position_embeddings: int
    """Longest sequence; sizes the learned position tables of OPT and GPT-2."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm / LayerNorm."""
    rope_theta: float = 10000.0
    """RoPE base (Llama family only)."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2, OPT, GPT-2)."""
    attention_out_bias: bool = False
    """Bias on the attention output projection (Llama with `attention_bias`, OPT, GPT-2)."""
    mlp_bias: bool = False
    """Bias on the MLP projections (OPT, GPT-2, Llama `mlp_bias`)."""
    tie_word_embeddings: bool = False
    """LM head shares the token embedding matrix (then there is no `lm_head` parameter)."""
    activation: str = "silu"
    """MLP non-linearity: one of `ACTIVATIONS` (gated for Llama, plain for OPT and GPT-2)."""
    do_layer_norm_before: bool = True
    """OPT: pre-LN blocks (125m, 1.3b, ...) when True, post-LN (350m) when False."""
    word_embed_proj_dim: int | None = None
    """OPT: width of the token embedding when it differs from `hidden_size` (350m: 512 vs 1024);
    the model then projects in after the embedding and out before the LM head."""
    dropout: float = 0.0
    """Residual dropout rate, kept for round trips; our modules always run deterministically."""
    attention_dropout: float = 0.0
    """Attention-probability dropout rate, kept for round trips; never applied."""
    embedding_dropout: float = 0.0
    """GPT-2 `embd_pdrop`, kept for round trips; never applied."""
    pad_token_id: int | None = None
    """Padding token id (only recorded; padding is read from the attention mask)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_id: int | tuple[int, ...] | None = None
    """End-of-sequence token id(s)."""
    use_parallel_residual: bool = True
    """GPT-NeoX: `x + attn(ln1(x)) + mlp(ln2(x))` blocks (Pythia) when True, sequential when
    False."""
    rotary_dim: int | None = None
    """Width of the rotated part of each head (GPT-NeoX `int(head_dim * rotary_pct)`); None
    rotates the whole head."""
    sliding_window: int | None = None
    """Local layers attend to the last `sliding_window` slots only (themselves included)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "sliding_attention" (local, `sliding_window`) or "full_attention" (HF's
    `layer_types`); None: every layer global."""
    query_pre_attn_scalar: float | None = None
    """Gemma 2/3: attention scores scale by `query_pre_attn_scalar**-0.5` (else `head_dim`)."""
    attn_logit_softcapping: float | None = None
    """Gemma 2: attention scores become `c * tanh(scores / c)`."""
    final_logit_softcapping: float | None = None
    """Gemma 2/3: LM logits become `c * tanh(logits / c)` (not the value head's outputs)."""
    qk_norm: bool = False
    """Gemma 3: per-head RMSNorms on queries and keys before RoPE (`q_norm`, `k_norm`)."""
    rope_local_theta: float | None = None
    """Gemma 3: RoPE base of the local layers (`rope_local_base_freq`); global layers use
    `rope_theta`."""
    rope_factor: float = 1.0
    """Linear RoPE scaling (`rope_type="linear"`, inv_freq / factor); Gemma 3: global layers."""
    dtype: str = "float32"
    """Computation dtype of activations: one of `DTYPES`."""
    param_dtype: str = "float32"
    """Storage dtype of parameters: one of `DTYPES`."""
    model_type: str | None = None
    """HF `model_type` read and written back (the family reads several: "llama", "mistral",
    "qwen2" are the "llama" family); None means the family's first one."""
    rope_type: str = "default"
    """HF `rope_parameters["rope_type"]`: one of `ROPE_TYPES`."""
    rope_factor: float = 1.0
    """RoPE scaling `factor` (linear: `inv_freq / factor`; llama3: of the low frequencies)."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE `low_freq_factor`."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE `high_freq_factor`."""
    rope_original_max_position_embeddings: int | None = None
    """llama3 / longrope `original_max_position_embeddings` (pre-training context length)."""
    rope_short_factor: tuple[float, ...] | None = None
    """longrope per-frequency divisors `[rotary_dim / 2]` within the original context."""
    rope_long_factor: tuple[float, ...] | None = None
    """longrope per-frequency divisors `[rotary_dim / 2]` beyond the original context."""
    rope_attention_factor: float | None = None
    """longrope scale of cos/sin; None derives it from the context extension as HF does."""
    rotary_dim: int | None = None
    """Rotated width of each head under partial rotary (GPT-NeoX `rotary_pct`, Phi-3
    `partial_rotary_factor`); None rotates all of `head_dim`."""
    sliding_window: int | None = None
    """Attention window W (a query sees its own and the W - 1 previous slots) of the layers
    `layer_types` marks "sliding_attention", or of every layer when `layer_types` is None
    (Mistral); None: global attention everywhere."""
    layer_types: tuple[str, ...] | None = None
    """Per layer one of `LAYER_TYPES` (HF `layer_types`: Qwen2/Qwen3 `max_window_layers`,
    Gemma 2/3 alternation); None: every layer alike."""
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys before RoPE (`q_norm` / `k_norm`: Qwen3, Gemma 3)."""
    query_pre_attn_scalar: float | None = None
    """Gemma 2/3: scores scaled by `query_pre_attn_scalar**-0.5` instead of `head_dim**-0.5`."""
    attn_logit_softcapping: float | None = None
    """Gemma 2: attention scores soft-capped at this value (`c * tanh(s / c)`)."""
    final_logit_softcapping: float | None = None
    """Gemma 2/3: LM-head logits soft-capped at this value."""
    rope_local_theta: float | None = None
    """Gemma 3: RoPE base of the sliding-window layers (`rope_theta` is the global one)."""
    use_parallel_residual: bool = False
    """GPT-NeoX: `x + attn(ln1(x)) + mlp(ln2(x))` instead of sequential residuals."""

    def __post_init__(self):
        from jax_rlhf.models import registry  # the family modules import this module

        family = registry.family(self.family)
        if self.model_type is None:
            object.__setattr__(self, "model_type", family.model_types[0])
        _check_choice("model_type", self.model_type, family.model_types)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("rope_type", self.rope_type, ROPE_TYPES)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("eos_token_id", "layer_types", "rope_short_factor", "rope_long_factor"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, not "
                                 f"num_layers={self.num_layers}")
            for layer_type in self.layer_types:
                _check_choice("layer_types entry", layer_type, LAYER_TYPES)
        if self.word_embed_proj_dim is not None and self.family != "opt":
            raise ValueError("word_embed_proj_dim is an OPT option")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim")
        if family.check is not None:
            family.check(self)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding, of the final hidden states and of the LM/value heads."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def hf_model_type(self) -> str:
        """`model_type` of the matching transformers config (`model_type`, resolved)."""
        return self.model_type

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of layer `layer`, or None when it attends globally."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (e.g. `cfg.replace(dtype="bfloat16")`)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> ModelConfig:
        """Reads a `transformers.PretrainedConfig` or a `config.json` dict.

        `overrides` replace fields after reading (typically `dtype` / `param_dtype`). Raises
        `ValueError` for model types and options our modules do not implement.
        """
        import transformers

        from jax_rlhf.models import registry

        if isinstance(hf_config, dict):
            hf_config = transformers.AutoConfig.for_model(**hf_config)
        family = registry.family_for_model_type(hf_config.model_type)
        fields = {"model_type": hf_config.model_type, **family.from_hf(hf_config)}
        eos = hf_config.eos_token_id
        fields.update(
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            pad_token_id=hf_config.pad_token_id,
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self, *, value_head: bool = False) -> Any:
        """The equivalent `transformers` config (`LlamaConfig`, `Qwen2Config`, `OPTConfig`, ...).

        With `value_head` it describes a `*ForSequenceClassification` with `num_labels=1`, the
        layout in which value-head models are saved (as the torch backend saves them).
        """
        from jax_rlhf.models import registry

        family = registry.family(self.family)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        common = dict(
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            dtype=self.param_dtype,
            **({"num_labels": 1} if value_head else {}),
        )
        hf_config = family.to_hf(self, common)
        hf_config.architectures = [family.architectures[hf_config.model_type][int(value_head)]]
        return hf_config


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
