"""`data.pad_with_eos` (DeepSpeed-Chat's pad = eos for non-Llama models) and the check of
`data.num_padding_at_beginning` against the tokenizer at the start of the reward step."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import make_char_tokenizer, pairwise_rows

from shared.data import (
    DataConfig,
    DataError,
    DatasetSpec,
    build_step_data,
    check_pad_with_eos,
    check_padding_at_beginning,
    padding_at_beginning,
    prepare_tokenizer,
)


def opt_like_tokenizer():
    """A character tokenizer shaped like OPT's: <pad> = 1, </s> = 2 is both BOS and EOS and is
    prepended to every text encoded with special tokens."""
    from tokenizers import processors

    tokenizer = make_char_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", eos)]
    )
    tokenizer.bos_token = "</s>"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (1, 2)
    return tokenizer


def test_pad_with_eos_replaces_an_existing_pad_token():
    tokenizer = opt_like_tokenizer()
    assert padding_at_beginning(tokenizer) == 0  # OPT's own <pad>: the BOS is no pad
    prepare_tokenizer(tokenizer, pad_with_eos=True)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2
    assert padding_at_beginning(tokenizer) == 1  # DS-Chat's OPT: the BOS </s> is the pad
    prepare_tokenizer(tokenizer, pad_with_eos=True)  # idempotent
    assert tokenizer.pad_token_id == 2


def test_pad_with_eos_needs_an_eos_token():
    with pytest.raises(DataError, match="pad_with_eos.*no eos"):
        prepare_tokenizer(make_char_tokenizer(eos=False), pad_with_eos=True)


def test_check_pad_with_eos():
    tokenizer = opt_like_tokenizer()
    check_pad_with_eos(tokenizer, False)
    with pytest.raises(DataError, match=r"data.pad_with_eos is true but the tokenizer pads "
                                        r"with '<pad>'.*prepare_tokenizer"):
        check_pad_with_eos(tokenizer, True)
    check_pad_with_eos(prepare_tokenizer(tokenizer, pad_with_eos=True), True)


def test_check_padding_at_beginning_opt_recipe_with_its_own_pad_fails():
    # DS-Chat's OPT flag (1) with OPT's own <pad>: the end would be found one token late.
    with pytest.raises(DataError, match=r"data.num_padding_at_beginning = 1, but the "
                                        r"tokenizer puts 0 pad token.*past the real end.*"
                                        r"data.pad_with_eos: true"):
        check_padding_at_beginning(opt_like_tokenizer(), 1)
    check_padding_at_beginning(opt_like_tokenizer(), 0)


def test_check_padding_at_beginning_with_pad_eq_bos():
    tokenizer = prepare_tokenizer(opt_like_tokenizer(), pad_with_eos=True)
    check_padding_at_beginning(tokenizer, 1)
    with pytest.raises(DataError, match=r"= 0, but the tokenizer puts 1 pad.*inside the "
                                        r"padding at the beginning.*set "
                                        r"data.num_padding_at_beginning: 1"):
        check_padding_at_beginning(tokenizer, 0)


def test_llama_like_bos_is_no_padding():
    tokenizer = make_char_tokenizer(bos=True)  # <s> BOS, <pad> pad
    assert padding_at_beginning(tokenizer) == 0
    check_padding_at_beginning(tokenizer, 0)


def _reward_config(path, **kwargs):
    kwargs = {"data_split": "0,1,0", "eval_fraction": 0.0, **kwargs}
    return DataConfig(datasets=[DatasetSpec(path, format="pairwise")], max_seq_len=24,
                      max_prompt_seq_len=8, **kwargs)


def test_reward_step_checks_the_padding_at_beginning(write_jsonl):
    path = write_jsonl("pairs.jsonl", pairwise_rows(6))
    with pytest.raises(DataError, match="data.num_padding_at_beginning = 1"):
        build_step_data(_reward_config(path, num_padding_at_beginning=1), opt_like_tokenizer(),
                        "reward")
    # the sft and ppo steps do not read it
    build_step_data(_reward_config(path, num_padding_at_beginning=1, data_split="1,0,0"),
                    opt_like_tokenizer(), "sft")


def test_reward_step_with_pad_with_eos_starts_every_sequence_with_the_pad(write_jsonl):
    rows = pairwise_rows(5) + [{"prompt": "a long prompt that loses its start?",
                                "chosen": " yes", "rejected": " no"}]
    path = write_jsonl("pairs.jsonl", rows)
    config = _reward_config(path, num_padding_at_beginning=1, pad_with_eos=True)
    with pytest.raises(DataError, match="prepare_tokenizer"):
        build_step_data(config, opt_like_tokenizer(), "reward")
    tokenizer = prepare_tokenizer(opt_like_tokenizer(), pad_with_eos=True)
    data = build_step_data(config, tokenizer, "reward")
    ids = np.concatenate([data.train.chosen_input_ids, data.train.rejected_input_ids])
    assert len(ids) == 12 and np.sum(ids[:, 0] == 2) == 10  # </s> = pad first
    # the long prompt was cut from the left and lost its BOS: both of its sequences counted
    assert data.report.get("reward/missing_padding_at_beginning") == 2


def test_pad_with_eos_must_be_a_bool():
    with pytest.raises(ValueError, match="pad_with_eos"):
        DataConfig(pad_with_eos="yes")
