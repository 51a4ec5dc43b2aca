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
