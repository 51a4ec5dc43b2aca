"""Helpers shared by the data-layer tests (imported by name; conftest holds the fixtures)."""

from __future__ import annotations

import string
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "configs" / "demo"

_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def make_char_tokenizer(*, pad: bool = True, eos: bool = True, bos: bool = False):
    """A character-level fast tokenizer over printable ASCII; one token per character.

    `bos=True` makes it prepend <s> to every text tokenised with special tokens (like Llama).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>"] + (["<pad>"] if pad else []) + (["</s>"] if eos else []) + ["<s>"]
    vocab = {token: i for i, token in enumerate(specials + list(_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    if eos:
        kwargs["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


def pairwise_rows(n: int, prefix: str = "q") -> list[dict[str, str]]:
    """n comparisons with distinct prompts `<prefix><i>?`."""
    return [
        {"prompt": f"{prefix}{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"}
        for i in range(n)
    ]
