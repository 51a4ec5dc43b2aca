"""Tiny Hugging Face model configs, a tokenizer and prompts for the torch tests.

The families cover the shapes DeepSpeed-Chat trains: Llama with grouped-query attention
(tied and untied embeddings), OPT in the OPT-350m shape (``word_embed_proj_dim`` !=
``hidden_size`` with project_in/out, post-LN) and a standard pre-LN OPT, and GPT-2.
"""

from __future__ import annotations

import torch

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
_SPECIAL = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}

FAMILIES = {
    "llama_gqa_untied": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, **_SPECIAL),
    "llama_gqa_tied": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=True, **_SPECIAL),
    "opt_350m_shape": dict(
        model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
        do_layer_norm_before=False, **_SPECIAL),
    "opt_pre_ln": dict(
        model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
        do_layer_norm_before=True, **_SPECIAL),
    "gpt2": dict(
        model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        **_SPECIAL),
}
# The substring DS-Chat users pass as --*_lora_module_name for each family.
LORA_MODULE_NAME = {"llama": "layers.", "opt": "decoder.layers.", "gpt2": "h."}


def build_tokenizer(with_pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    if not with_pad:
        words = words[1:]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_pad:
        specials["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def left_padded_prompts(seed: int = 0, batch: int = 3, width: int = 6):
    """[B, P] prompts of different lengths, left-padded with PAD, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, width), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = row % width  # row 0 unpadded, row 1 one pad, ...
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask
