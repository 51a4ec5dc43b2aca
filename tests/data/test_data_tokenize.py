"""Tokenisation into fixed shapes: padding sides, truncation counts, masks, pad-token repair."""

import numpy as np
import pytest
from data_helpers import make_char_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.data import (
    DataConfig,
    DataError,
    DataReport,
    DatasetSpec,
    PairwiseBatch,
    PairwiseExample,
    PromptExample,
    RankingBatch,
    RankingExample,
    SFTExample,
    build_ptx_data,
    build_step_data,
    encode_prompts,
    encode_responses,
    end_of_conversation_ids,
    prepare_tokenizer,
)
from shared.data import tokenize as tok_module
from shared.data.tokenize import (
    encode_pairwise,
    encode_prompt_batch,
    encode_ranking,
    encode_sft,
    encode_text_blocks,
)

PAD, EOS = 1, 2  # ids of <pad> and </s> in the test tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompts_left_padded_and_left_truncated(tokenizer):
    report = DataReport()
    ids, mask = encode_prompts(tokenizer, ["ab", "0123456789"], max_prompt_seq_len=6, report=report)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 6)
    assert ids[0].tolist() == [PAD] * 4 + ids_of(tokenizer, "ab")
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert ids[1].tolist() == ids_of(tokenizer, "456789")  # the end of the prompt is kept
    assert mask[1].tolist() == [1] * 6
    assert report.get("ppo/prompt_truncated") == 1


def test_responses_right_padded_with_eoc(tokenizer):
    report = DataReport()
    ids, mask = encode_responses(
        tokenizer, ["19", "123456"], max_answer_seq_len=4, eoc_ids=[EOS], report=report
    )
    assert ids[0].tolist() == ids_of(tokenizer, "19") + [EOS, PAD]
    assert mask[0].tolist() == [1, 1, 1, 0]
    assert ids[1].tolist() == ids_of(tokenizer, "1234")  # the end (and eoc) is cut
    assert report.get("ppo/response_truncated") == 1


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_sft_masks(tokenizer, train_on_prompt):
    batch = encode_sft(
        tokenizer,
        [SFTExample("1+2=", "3")],
        max_seq_len=8,
        max_prompt_seq_len=6,
        eoc_ids=[EOS],
        train_on_prompt=train_on_prompt,
        report=DataReport(),
    )
    assert batch.input_ids.shape == (1, 8) and batch.input_ids.dtype == np.int32
    assert batch.input_ids[0].tolist() == ids_of(tokenizer, "1+2=3") + [EOS, PAD, PAD]
    assert batch.attention_mask[0].tolist() == [1] * 6 + [0, 0]
    expected = [1] * 6 if train_on_prompt else [0, 0, 0, 0, 1, 1]
    assert batch.loss_mask[0].tolist() == expected + [0, 0]


def test_sequence_truncation_is_counted(tokenizer):
    report = DataReport()
    batch = encode_sft(
        tokenizer,
        [SFTExample("abcdefgh", "xyz"), SFTExample("ab", "x")],
        max_seq_len=6,
        max_prompt_seq_len=4,
        eoc_ids=[EOS],
        train_on_prompt=False,
        report=report,
    )
    # prompt cut from the left to 4 tokens, then the response from the right to fit 6
    assert batch.input_ids[0].tolist() == ids_of(tokenizer, "efghxy")
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert report.get("sft/prompt_truncated") == 1
    assert report.get("sft/response_truncated") == 1


def test_pairwise_shares_the_truncated_prompt(tokenizer):
    report = DataReport()
    batch = encode_pairwise(
        tokenizer,
        [PairwiseExample("abcdef", "1", "22")],
        max_seq_len=8,
        max_prompt_seq_len=3,
        eoc_ids=[EOS],
        report=report,
    )
    assert isinstance(batch, PairwiseBatch)
    assert batch.chosen_input_ids[0].tolist() == ids_of(tokenizer, "def1") + [EOS] + [PAD] * 3
    assert batch.rejected_input_ids[0].tolist() == ids_of(tokenizer, "def22") + [EOS, PAD, PAD]
    assert batch.rejected_attention_mask[0].tolist() == [1] * 6 + [0, 0]
    assert report.get("reward/prompt_truncated") == 1  # once per comparison


def test_ranking_batch(tokenizer):
    batch = encode_ranking(
        tokenizer,
        [RankingExample("p", ("a", "b", "c")), PairwiseExample("q", "x", "y")],
        max_seq_len=5,
        max_prompt_seq_len=2,
        eoc_ids=[EOS],
        report=DataReport(),
    )
    assert isinstance(batch, RankingBatch)
    assert batch.input_ids.shape == (2, 3, 5) and batch.attention_mask.shape == (2, 3, 5)
    assert batch.num_valid.tolist() == [3, 2]
    assert batch.input_ids[0, 2].tolist() == ids_of(tokenizer, "pc") + [EOS, PAD, PAD]
    assert batch.input_ids[1, 1].tolist() == ids_of(tokenizer, "qy") + [EOS, PAD, PAD]
    assert batch.attention_mask[1, 2].sum() == 0 and (batch.input_ids[1, 2] == PAD).all()


def test_prompt_batch_keeps_text_and_references_and_drops_empty(tokenizer):
    report = DataReport()
    batch = encode_prompt_batch(
        tokenizer,
        [PromptExample("1+1=", "2"), PromptExample(""), PromptExample("x")],
        max_prompt_seq_len=4,
        report=report,
    )
    assert len(batch) == 2
    assert batch.prompt_text.tolist() == ["1+1=", "x"]
    assert batch.reference.tolist() == ["2", ""]
    assert report.get("ppo/empty_prompt") == 1


def test_bos_is_added_to_prompts_only():
    tokenizer = make_char_tokenizer(bos=True)
    bos = tokenizer.bos_token_id
    batch = encode_sft(
        tokenizer,
        [SFTExample("ab", "c")],
        max_seq_len=6,
        max_prompt_seq_len=4,
        eoc_ids=[EOS],
        train_on_prompt=False,
        report=DataReport(),
    )
    assert batch.input_ids[0].tolist() == [bos] + ids_of(tokenizer, "abc") + [EOS, PAD]
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0]


def test_text_blocks(tokenizer):
    report = DataReport()
    batch = encode_text_blocks(tokenizer, ["abc", "de"], block_len=4, eoc_ids=[EOS], report=report)
    stream = ids_of(tokenizer, "abc") + [EOS] + ids_of(tokenizer, "de") + [EOS]
    assert batch.input_ids.tolist() == [stream[:4], stream[4:] + [PAD]]
    assert batch.attention_mask.tolist() == [[1] * 4, [1, 1, 1, 0]]
    assert report.get("ptx/blocks") == 2 and report.get("ptx/padding_tokens") == 1


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.text(alphabet="ab+=12 ", max_size=12), min_size=1, max_size=5),
    length=st.integers(1, 8),
)
def test_padding_never_changes_the_real_tokens(prompts, length):
    tokenizer = make_char_tokenizer()
    report = DataReport()
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_seq_len=length, report=report)
    for row, row_mask, prompt in zip(ids, mask, prompts, strict=True):
        full = ids_of(tokenizer, prompt)
        kept = full[-length:] if full else []
        assert row[row_mask == 1].tolist() == kept
        assert (row[row_mask == 0] == PAD).all()
        assert row_mask.tolist() == sorted(row_mask.tolist())  # pads only on the left
    assert report.get("ppo/prompt_truncated") == sum(
        len(ids_of(tokenizer, p)) > length for p in prompts
    )


# --- end-of-conversation and pad tokens ---------------------------------------------------


def test_end_of_conversation_ids(tokenizer):
    assert end_of_conversation_ids(tokenizer, None) == [EOS]
    assert end_of_conversation_ids(tokenizer, "</s>") == [EOS]
    assert end_of_conversation_ids(tokenizer, "<|end|>") == ids_of(tokenizer, "<|end|>")
    with pytest.raises(DataError, match="no eos token; set DataConfig.end_of_conversation_token"):
        end_of_conversation_ids(make_char_tokenizer(eos=False), None)


def test_tokenizer_without_pad_uses_eos_with_a_warning():
    tokenizer = make_char_tokenizer(pad=False)
    with pytest.warns(UserWarning, match="no pad token; using its eos token"):
        prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_tokenizer_without_pad_or_eos_gets_a_new_pad_token():
    tokenizer = make_char_tokenizer(pad=False, eos=False)
    size = len(tokenizer)
    with pytest.warns(UserWarning, match="added '<pad>'.*resize"):
        prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == size + 1


def test_pipeline_repairs_the_pad_token_with_a_warning(write_jsonl):
    path = write_jsonl("q.jsonl", [{"prompt": "ab"}])
    tokenizer = make_char_tokenizer(pad=False)
    config = DataConfig(datasets=(DatasetSpec(path),), eval_fraction=0, max_prompt_seq_len=4)
    with pytest.warns(UserWarning, match="no pad token"):
        data = build_step_data(config, tokenizer, "ppo")
    assert data.train.prompt_input_ids[0, :2].tolist() == [tokenizer.eos_token_id] * 2


def test_progress_bar_on_large_inputs(tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(tok_module, "PROGRESS_MIN_TEXTS", 2)
    tok_module.token_lists(tokenizer, ["a", "b", "c"], add_special_tokens=False, desc="demo")
    assert "demo" in capsys.readouterr().err


# --- through the pipeline -----------------------------------------------------------------


def test_step_batches_have_fixed_shapes_and_int32(write_jsonl, write_text, tokenizer):
    pairs = write_jsonl(
        "p.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    )
    ptx = write_text("ptx.txt", "hello world\nsecond line\n")
    config = DataConfig(
        datasets=(DatasetSpec(pairs),),
        max_seq_len=12,
        max_prompt_seq_len=5,
        max_answer_seq_len=3,
        eval_fraction=0.2,
        unsupervised_dataset_name=ptx,
    )
    shapes = {"sft": (12,), "reward": (12,), "ppo": (5,)}
    for step, (length,) in shapes.items():
        data = build_step_data(config, tokenizer, step)
        for batch in (data.train, data.eval):
            for name, array in batch.arrays().items():
                if array.dtype.kind == "U":
                    continue
                assert array.dtype == np.int32, (step, name)
                if name == "prompt_lengths":  # PairwiseBatch: one per comparison
                    assert array.shape == (len(batch),) and (array < length).all()
                    continue
                assert array.shape == (len(batch), length), (step, name)
    ptx_data = build_ptx_data(config, tokenizer)
    assert ptx_data.train.input_ids.shape[1] == 8 and ptx_data.eval is None


def test_reward_step_mixes_rankings_and_pairs(write_jsonl, tokenizer):
    pairs = write_jsonl("p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    ranks = write_jsonl("r.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"]}])
    config = DataConfig(
        datasets=(DatasetSpec(pairs, steps=("reward",)), DatasetSpec(ranks, steps=("reward",))),
        eval_fraction=0,
        max_seq_len=6,
    )
    data = build_step_data(config, tokenizer, "reward")
    assert isinstance(data.train, RankingBatch)
    assert sorted(data.train.num_valid.tolist()) == [2, 3]


def test_eval_truncations_are_counted_apart(write_jsonl, tokenizer):
    path = write_jsonl("q.jsonl", [{"prompt": "x" * 10} for _ in range(10)])
    config = DataConfig(datasets=(DatasetSpec(path),), eval_fraction=0.2, max_prompt_seq_len=4,
                        max_truncated_fraction=1.0)
    report = build_step_data(config, tokenizer, "ppo").report
    assert report.get("ppo/prompt_truncated") == 8
    assert report.get("ppo_eval/prompt_truncated") == 2
    assert "ppo/prompt_truncated: 8" in report.summary()
