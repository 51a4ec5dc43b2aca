"""One frozen configuration for every decoder-only family, convertible to and from Hugging Face.

`ModelConfig.from_hf` reads a `transformers` config (object or `config.json` dict) and rejects
the options our modules do not implement rather than silently ignoring them; `to_hf` builds the
matching `transformers` config so that exported checkpoints load with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "opt", "gpt2")
HF_ARCHITECTURES = {  # model_type -> (causal LM class, value-head class) in transformers
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "opt": ("OPTForCausalLM", "OPTForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
}
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only causal LM; shared by the Llama, OPT and GPT-2 modules."""

    family: str
    """Which module builds the backbone: one of `FAMILIES`. Qwen2 is the "llama" family with
    q/k/v biases and no output-projection bias."""
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

    def __post_init__(self):
        _check_choice("family", self.family, FAMILIES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.family != "llama" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"family {self.family!r} has no grouped-query attention")
        if self.family != "llama" and self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"family {self.family!r} needs head_dim * num_heads == hidden_size")
        if self.family == "llama" and self.attention_out_bias and not self.attention_bias:
            raise ValueError("llama family: attention_out_bias requires attention_bias")
        if self.word_embed_proj_dim is not None and self.family != "opt":
            raise ValueError("word_embed_proj_dim is an OPT option")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding, of the final hidden states and of the LM/value heads."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def hf_model_type(self) -> str:
        """`model_type` of the matching transformers config."""
        if self.family == "llama" and self.attention_bias and not self.attention_out_bias:
            return "qwen2"
        return self.family

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

        if isinstance(hf_config, dict):
            hf_config = transformers.AutoConfig.for_model(**hf_config)
        model_type = hf_config.model_type
        readers = {"llama": _from_llama, "qwen2": _from_qwen2, "opt": _from_opt, "gpt2": _from_gpt2}
        if model_type not in readers:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(readers)}")
        fields = readers[model_type](hf_config)
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
        """The equivalent `transformers` config: Llama-, Qwen2-, OPT- or GPT2Config.

        With `value_head` it describes a `*ForSequenceClassification` with `num_labels=1`, the
        layout in which value-head models are saved (as the torch backend saves them).
        """
        import transformers

        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        common = dict(
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            dtype=self.param_dtype,
            architectures=[HF_ARCHITECTURES[self.hf_model_type][int(value_head)]],
            **({"num_labels": 1} if value_head else {}),
        )
        if self.family == "llama":
            llama_like = dict(
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                hidden_act=self.activation,
                max_position_embeddings=self.max_position_embeddings,
                rms_norm_eps=self.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                attention_dropout=self.attention_dropout,
                **common,
            )
            if self.hf_model_type == "qwen2":
                if self.mlp_bias:
                    raise ValueError("Qwen2 has no MLP bias")
                return transformers.Qwen2Config(**llama_like)
            return transformers.LlamaConfig(
                attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, **llama_like
            )
        if self.family == "opt":
            return transformers.OPTConfig(
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                ffn_dim=self.intermediate_size,
                max_position_embeddings=self.max_position_embeddings,
                do_layer_norm_before=self.do_layer_norm_before,
                word_embed_proj_dim=self.embed_dim,
                dropout=self.dropout,
                attention_dropout=self.attention_dropout,
                activation_function=self.activation,
                **common,
            )
        return transformers.GPT2Config(
            n_embd=self.hidden_size,
            n_layer=self.num_layers,
            n_head=self.num_heads,
            n_inner=self.intermediate_size,
            n_positions=self.max_position_embeddings,
            layer_norm_epsilon=self.norm_eps,
            activation_function=self.activation,
            resid_pdrop=self.dropout,
            attn_pdrop=self.attention_dropout,
            embd_pdrop=self.embedding_dropout,
            **common,
        )


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _require(hf_config: Any, name: str, expected: Any) -> None:
    """Rejects an HF option whose non-default value our modules do not implement."""
    value = getattr(hf_config, name, expected)
    if value != expected:
        raise ValueError(
            f"{hf_config.model_type}: {name}={value!r} is not supported (only {expected!r})"
        )


def _rope_theta(hf_config: Any) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{hf_config.model_type}: rope_type={rope_type!r} is not supported")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _llama_like(hf_config: Any) -> dict[str, Any]:
    heads = hf_config.num_attention_heads
    return dict(
        family="llama",
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        activation=hf_config.hidden_act,
        attention_dropout=float(hf_config.attention_dropout),
    )


def _from_llama(hf_config: Any) -> dict[str, Any]:
    _require(hf_config, "pretraining_tp", 1)
    return dict(
        _llama_like(hf_config),
        attention_bias=hf_config.attention_bias,
        attention_out_bias=hf_config.attention_bias,
        mlp_bias=hf_config.mlp_bias,
    )


def _from_qwen2(hf_config: Any) -> dict[str, Any]:
    _require(hf_config, "use_sliding_window", False)
    return dict(_llama_like(hf_config), attention_bias=True)


def _from_opt(hf_config: Any) -> dict[str, Any]:
    _require(hf_config, "enable_bias", True)
    _require(hf_config, "layer_norm_elementwise_affine", True)
    _require(hf_config, "_remove_final_layer_norm", False)
    heads = hf_config.num_attention_heads
    proj = hf_config.word_embed_proj_dim
    return dict(
        family="opt",
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf_config.hidden_size // heads,
        intermediate_size=hf_config.ffn_dim,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=1e-5,  # torch.nn.LayerNorm default; OPTConfig has no epsilon field
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        activation=hf_config.activation_function,
        do_layer_norm_before=hf_config.do_layer_norm_before,
        word_embed_proj_dim=None if proj in (None, hf_config.hidden_size) else proj,
        dropout=float(hf_config.dropout),
        attention_dropout=float(hf_config.attention_dropout),
    )


def _from_gpt2(hf_config: Any) -> dict[str, Any]:
    _require(hf_config, "scale_attn_weights", True)
    _require(hf_config, "scale_attn_by_inverse_layer_idx", False)
    _require(hf_config, "add_cross_attention", False)
    hidden, heads = hf_config.n_embd, hf_config.n_head
    return dict(
        family="gpt2",
        hidden_size=hidden,
        num_layers=hf_config.n_layer,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf_config.n_inner or 4 * hidden,
        max_position_embeddings=hf_config.n_positions,
        norm_eps=hf_config.layer_norm_epsilon,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        activation=hf_config.activation_function,
        dropout=float(hf_config.resid_pdrop),
        attention_dropout=float(hf_config.attn_pdrop),
        embedding_dropout=float(hf_config.embd_pdrop),
    )
