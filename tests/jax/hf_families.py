"""What the per-family tests against Hugging Face share: redrawing a tiny HF model's weights,
building and saving each variant once, the token ids of a padded batch, HF's outputs with
position ids from the mask, our jitted forward, and the largest difference on real tokens."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import transformers
from flax import nnx


def randomize(model: torch.nn.Module, seed: int, *, scale: float = 0.2) -> None:
    """N(0, scale^2) everywhere, norm weights (1-D ``weight``) around HF's identity: 1, or 0
    for Gemma's ``1 + weight`` norms; every layer then contributes visibly."""
    gen = torch.Generator().manual_seed(seed)
    centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * scale
            is_norm_weight = param.ndim == 1 and name.endswith("weight")
            param.copy_(noise + (centre if is_norm_weight else 0.0))


def checkpoint_builder(configs: dict[str, Callable[[], transformers.PretrainedConfig]],
                       tmp_path_factory):
    """``get(name, value_head=False) -> (HF model, saved directory)``: the variant
    ``configs[name]()`` as an eager ``AutoModelForCausalLM`` (or a one-label
    ``AutoModelForSequenceClassification``), weights redrawn, built and saved once."""
    built: dict[tuple[str, bool], tuple[torch.nn.Module, object]] = {}

    def get(name: str, value_head: bool = False):
        if (name, value_head) not in built:
            torch.manual_seed(0)
            hf_config = configs[name]()
            auto = transformers.AutoModelForCausalLM
            if value_head:
                hf_config.num_labels = 1
                auto = transformers.AutoModelForSequenceClassification
            model = auto.from_config(hf_config, attn_implementation="eager").eval()
            randomize(model, seed=len(built))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name, value_head] = model, path
        return built[name, value_head]

    return get


def token_ids(mask: np.ndarray, vocab: int, seed: int = 0) -> np.ndarray:
    """Random ids in [3, vocab) where ``mask`` is 1, pad id 0 elsewhere."""
    ids = np.random.default_rng(seed).integers(3, vocab, mask.shape)
    return np.where(mask == 1, ids, 0)


def hf_outputs(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF logits ``[B, T, V]``, or per-token values ``[B, T]`` of a sequence classifier, with
    position ids from the mask as HF ``generate`` (and both our backends) derive them."""
    mask_t = torch.from_numpy(mask).long()
    kwargs = dict(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=mask_t,
        position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),
    )
    with torch.no_grad():
        if hasattr(model, "score"):
            return model.score(model.base_model(**kwargs).last_hidden_state)[..., 0].numpy()
        return model(**kwargs).logits.numpy()


@nnx.jit
def forward(model, ids, mask):
    """Our model's output (logits or values) on ``ids`` under ``mask``."""
    return model(ids, mask)[0]


def max_diff(ours, expected, mask) -> float:
    """Largest absolute difference on real tokens (padding means nothing in either model)."""
    real = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[real] - expected[real])))


def assert_block_matches_hf(hf_model, ours, layers, *, length: int = 10, atol: float = 1e-5):
    """Decoder blocks ``layers`` of ``ours`` (a loaded `CausalLM`) against HF's decoder layers
    on the same random hidden states, HF's mask built here: causal, and within the sliding
    window on local layers (``config.layer_types``, else every layer when the config sets
    ``sliding_window``), ``length`` tokens (more than the windows hold)."""
    import jax.numpy as jnp

    from jax_rlhf.models.kv_cache import attention_context

    config, hf_base = hf_model.config, hf_model.base_model
    x = np.random.default_rng(1).normal(size=(2, length, config.hidden_size)).astype(np.float32)
    x_t, positions = torch.from_numpy(x), torch.arange(length)[None].expand(2, -1)
    for layer in layers:
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            local = layer_types[layer] == "sliding_attention"
        else:
            local = getattr(config, "sliding_window", None) is not None
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        if local:
            allowed &= ~torch.ones(length, length, dtype=torch.bool).tril(-config.sliding_window)
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        rope_args = ()
        if config.model_type == "gemma3_text":
            rope_args = (layer_types[layer],)
        with torch.no_grad():
            cos_sin = hf_base.rotary_emb(x_t, positions, *rope_args)
            expected = hf_base.layers[layer](
                hidden_states=x_t, attention_mask=mask[None, None], position_embeddings=cos_sin
            )
        expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
        ctx = attention_context(jnp.ones((2, length), jnp.int32), None)
        got, _ = ours.model.layers[layer](jnp.asarray(x), ctx)
        np.testing.assert_allclose(np.asarray(got), expected, atol=atol, rtol=0,
                                   err_msg=f"layer {layer}")
