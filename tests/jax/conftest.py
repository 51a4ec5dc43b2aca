"""Tiny random Hugging Face checkpoints (built with transformers config classes) for parity tests.

Each variant is built once per session with `attn_implementation="eager"`, its weights redrawn
at a scale where a wrong transpose or head order shows up far above the tolerances, and saved
with `save_pretrained` to a temporary directory.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_families import checkpoint_builder

from jax_rlhf.models import CausalLM, ModelConfig, load_causal_lm

jax.config.update("jax_numpy_rank_promotion", "raise")
torch.set_num_threads(1)

VOCAB = 100
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
_LLAMA = dict(
    _COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
_OPT = dict(
    _COMMON, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=2
)

HF_CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(**_LLAMA, num_key_value_heads=2),
    "llama_tied": lambda: transformers.LlamaConfig(
        **_LLAMA, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "llama_bias": lambda: transformers.LlamaConfig(
        **_LLAMA, num_key_value_heads=2, attention_bias=True, rope_theta=500.0
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA, num_key_value_heads=1),
    "opt_350m": lambda: transformers.OPTConfig(
        **_OPT, word_embed_proj_dim=16, do_layer_norm_before=False
    ),
    "opt": lambda: transformers.OPTConfig(**_OPT),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    ),
}
"""Every variant the parity tests run on: GQA, tied, biased (Qwen2-like) Llama, Qwen2 itself,
OPT in the 350m shape (projected embeddings, post-LN) and standard pre-LN, GPT-2."""

ONE_PER_FAMILY = ("llama_gqa", "opt_350m", "gpt2")

PADDINGS = {
    "right": np.array([[1] * 8, [1] * 5 + [0] * 3]),
    "left": np.array([[1] * 8, [0] * 3 + [1] * 5]),
}


def pytest_generate_tests(metafunc):
    """Named parametrisation: `variant` (every HF config), `family_variant` (one per family),
    `padding` (a right- and a left-padded batch of 2 x 8)."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", list(HF_CONFIGS))
    if "family_variant" in metafunc.fixturenames:
        metafunc.parametrize("family_variant", ONE_PER_FAMILY)
    if "padding" in metafunc.fixturenames:
        metafunc.parametrize("padding", list(PADDINGS))


@dataclasses.dataclass
class HFCheckpoint:
    name: str
    model: transformers.PreTrainedModel
    path: Path
    family: str


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(name, value_head=False) -> HFCheckpoint`, built and saved once per session.

    With `value_head` the model is an `AutoModelForSequenceClassification` with one label: the
    torch backend's reward model / critic.
    """
    build = checkpoint_builder(HF_CONFIGS, tmp_path_factory)

    def get(name: str, value_head: bool = False) -> HFCheckpoint:
        model, path = build(name, value_head)
        return HFCheckpoint(name, model, path, ModelConfig.from_hf(model.config).family)

    return get


@pytest.fixture(scope="session")
def ours(hf_checkpoint):
    """`ours(name) -> CausalLM` converted from the session's HF checkpoint."""
    loaded: dict[str, CausalLM] = {}

    def get(name: str) -> CausalLM:
        if name not in loaded:
            loaded[name] = load_causal_lm(hf_checkpoint(name).path)
        return loaded[name]

    return get


@functools.partial(nnx.jit, static_argnames="method")
def _jit_apply(module, *args, method="__call__", **kwargs):
    return getattr(module, method)(*args, **kwargs)


@pytest.fixture
def apply():
    """`apply(module, *args, method="__call__", **kwargs)`, jitted: one compile per module
    structure and input shape is several times cheaper on CPU than running op by op."""
    return _jit_apply


@pytest.fixture
def hf_configs():
    """Name -> zero-argument factory of the HF config of every variant."""
    return HF_CONFIGS


@pytest.fixture
def attention_mask(padding) -> np.ndarray:
    """`[2, 8]` mask of the parametrised `padding`."""
    return PADDINGS[padding]


@pytest.fixture
def token_ids():
    """`token_ids(batch, length, seed=0)`: random ids avoiding the special ids 0-2."""
    return lambda batch, length, seed=0: np.random.default_rng(seed).integers(
        3, VOCAB, (batch, length)
    )


@pytest.fixture
def hf_forward():
    return _hf_forward


def _hf_forward(ckpt: HFCheckpoint, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF torch logits `[B, T, V]`, or per-token values `[B, T]` of a value-head checkpoint
    (`score` on every last hidden state, as the torch backend's `ValueModel` reads them).

    Llama and GPT-2 get position ids the way HF `generate` derives them from the mask; OPT
    derives them from the mask itself.
    """
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    kwargs = {"input_ids": ids_t, "attention_mask": mask_t}
    if ckpt.family != "opt":
        kwargs["position_ids"] = (mask_t.cumsum(-1) - 1).masked_fill(mask_t == 0, 0)
    with torch.no_grad():
        if not hasattr(ckpt.model, "score"):
            return ckpt.model(**kwargs).logits.numpy()
        hidden = ckpt.model.base_model(**kwargs).last_hidden_state  # [B, T, E]
        return ckpt.model.score(hidden)[..., 0].numpy()


# -- tiny end-to-end runs on the demo data --------------------------------------------------


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """`tiny_config(**sections) -> Path` of a YAML file: `jax_tiny_runs.TINY_RUN` deep-merged
    with `sections`."""
    import yaml
    from jax_tiny_runs import tiny_run

    def make(**sections) -> Path:
        path = tmp_path_factory.mktemp("config") / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_run(**sections)))
        return path

    return make
