"""What every exported directory must be: it loads with AutoTokenizer and AutoModelFor*,
carries its model card (and, for a causal LM, its generation config), and a causal LM
generates."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


def assert_export_complete(directory: str | Path, *, kind: str, backend: str = "torch") -> None:
    """``kind``: ``"lm"`` (a causal LM, which must also generate) or ``"value"``."""
    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    card = (directory / "README.md").read_text()
    assert f"backend `{backend}`" in card, card
    if kind == "value":
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        assert model.config.num_labels == 1
        return
    assert (directory / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(directory)
    prompt = tokenizer("1 + 1 =", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
