"""torch_rlhf.models: loading, value models, dropout, LoRA, saving, tokenizers."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from tiny_hf import EOS, FAMILIES, LORA_MODULE_NAME, PAD, VOCAB, left_padded_prompts

from torch_rlhf.lora import apply_lora, lora_target_names
from torch_rlhf.models import (
    ValueModel,
    build_causal_lm,
    build_value_model,
    causal_lm_logits,
    check_reward_tokenizer,
    gather_end_values,
    load_tokenizer,
    position_ids_from_mask,
    takes_logits_to_keep,
)
from torch_rlhf.saving import gather_params_for, save_hf

ALL = sorted(FAMILIES)


def _family(name: str) -> str:
    return FAMILIES[name]["model_type"]


@pytest.mark.parametrize("family", ALL)
def test_load_round_trip_matches_built_model(family, model_dirs, tmp_path):
    torch.manual_seed(0)
    built = build_causal_lm(config_dict=FAMILIES[family])
    loaded = build_causal_lm(model_dirs(family))
    assert type(loaded).__name__ == type(built).__name__
    assert loaded.config._attn_implementation == "eager"  # CPU: exact numerics
    ids, mask = left_padded_prompts()
    torch.testing.assert_close(causal_lm_logits(loaded, ids, mask),
                               causal_lm_logits(built, ids, mask), rtol=0, atol=1e-6)
    save_hf(loaded, None, str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # HF's default attention
    real = mask.bool()  # rows of padding queries are implementation-defined
    torch.testing.assert_close(causal_lm_logits(again, ids, mask)[real],
                               causal_lm_logits(built, ids, mask)[real], rtol=0, atol=1e-5)


def test_tied_and_untied_llama_embeddings(model_dirs):
    tied = build_causal_lm(model_dirs("llama_gqa_tied"))
    untied = build_causal_lm(model_dirs("llama_gqa_untied"))
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    assert tied.config.num_key_value_heads < tied.config.num_attention_heads


@pytest.mark.parametrize("family", ["llama_gqa_untied", "opt_350m_shape", "gpt2"])
def test_left_padding_never_changes_logits(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    ids = torch.randint(4, VOCAB, (1, 5))
    padded = torch.cat([torch.full((1, 3), PAD), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(causal_lm_logits(model, padded, mask)[:, 3:],
                               causal_lm_logits(model, ids, torch.ones_like(ids)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa_untied", "opt_350m_shape", "gpt2"])
def test_logits_of_some_positions_equal_slicing_the_full_logits(family, model_dirs):
    """``causal_lm_logits(positions=...)`` (PPO's answer logits through HF ``logits_to_keep``)
    equals the full forward sliced, also for a model whose
    forward lacks ``logits_to_keep`` (it then slices after the head)."""
    model = build_causal_lm(model_dirs(family))
    ids = torch.randint(4, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    full = causal_lm_logits(model, ids, mask)
    answer = slice(4, -1)
    torch.testing.assert_close(causal_lm_logits(model, ids, mask, positions=answer),
                               full[:, answer], rtol=0, atol=1e-5)

    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)

    assert takes_logits_to_keep(model) and not takes_logits_to_keep(NoKeep(model))
    torch.testing.assert_close(causal_lm_logits(NoKeep(model), ids, mask, positions=answer),
                               full[:, answer], rtol=0, atol=1e-5)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("family", ["llama_gqa_untied", "opt_350m_shape", "gpt2"])
def test_dropout_disabled_everywhere(family, model_dirs):
    model = build_causal_lm(model_dirs(family), disable_dropout=True)
    model.train()
    config = model.config.to_dict()
    named = {k: v for k, v in config.items() if "dropout" in k or k.endswith("_pdrop")}
    assert named and all(v == 0.0 for v in named.values() if isinstance(v, float))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids, mask = left_padded_prompts()
    torch.testing.assert_close(causal_lm_logits(model, ids, mask),
                               causal_lm_logits(model, ids, mask), rtol=0, atol=0)


def test_explicit_dropout_value_wins(model_dirs):
    model = build_causal_lm(model_dirs("gpt2"), dropout=0.25)
    assert model.config.resid_pdrop == 0.25 and model.config.attn_pdrop == 0.25
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}


def test_vocab_grows_to_multiple_of_eight(model_dirs):
    model = build_causal_lm(model_dirs("opt_350m_shape"), vocab_size=VOCAB + 3)
    assert model.get_input_embeddings().num_embeddings == 72
    assert model.get_output_embeddings().out_features == 72
    same = build_causal_lm(model_dirs("opt_350m_shape"), vocab_size=VOCAB - 10)
    assert same.get_input_embeddings().num_embeddings == VOCAB  # never shrinks


def test_gradient_checkpointing_trains(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"), gradient_checkpointing=True)
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ids, mask = left_padded_prompts()
    causal_lm_logits(model, ids, mask).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_gradient_checkpointing_with_lora_only_critic(model_dirs):
    # DS-Chat's --critic_gradient_checkpointing with --only_optimize_lora.
    critic = build_value_model(model_dirs("opt_350m_shape"), gradient_checkpointing=True)
    apply_lora(critic, dim=2, module_name="decoder.layers.", only_optimize=True)
    critic.train()
    ids, mask = left_padded_prompts()
    critic(ids, mask).sum().backward()
    grads = {n: p.grad for n, p in critic.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if "lora_A" in n or "score" in n)


def test_build_needs_exactly_one_source(model_dirs):
    with pytest.raises(ValueError, match="exactly one"):
        build_causal_lm()
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm(config_dict={"hidden_size": 8})


# ------------------------------------------------------------------ value models


@pytest.mark.parametrize("family,head_width", [
    ("llama_gqa_untied", 32), ("opt_350m_shape", 16), ("opt_pre_ln", 32), ("gpt2", 32)])
def test_value_model_head_and_shapes(family, head_width, model_dirs):
    value_model = build_value_model(model_dirs(family), pad_token_id=PAD)
    score = value_model.model.score
    assert isinstance(value_model.model, transformers.PreTrainedModel)
    assert (score.in_features, score.out_features, score.bias) == (head_width, 1, None)
    assert value_model.config.pad_token_id == PAD
    ids, mask = left_padded_prompts()
    values = value_model(ids, mask)
    assert values.shape == ids.shape
    # The head reads the backbone's final hidden state (after OPT's project_out).
    hidden = value_model.model.base_model(input_ids=ids, attention_mask=mask,
                                          position_ids=position_ids_from_mask(mask))
    torch.testing.assert_close(values, score(hidden.last_hidden_state)[..., 0])


def _dschat_end_scores(values, input_ids, prompt_length, pad_id):
    """Transcription of DS-Chat's RewardModel.forward_value end-score loop."""
    scores = []
    for row_ids, row_values in zip(input_ids, values, strict=True):
        pads = (row_ids[prompt_length:] == pad_id).nonzero()
        end = pads[0].item() + prompt_length if len(pads) > 0 else input_ids.shape[1]
        scores.append(row_values[end - 1])
    return torch.stack(scores)


def test_end_scores_pick_last_answer_token(model_dirs):
    value_model = build_value_model(model_dirs("opt_350m_shape"), pad_token_id=PAD)
    prompt = torch.tensor([[PAD, 5, 6], [7, 8, 9], [PAD, PAD, 4], [5, 5, 5]])
    answer = torch.tensor([[10, 11, EOS, PAD], [12, 13, 14, 15], [PAD, PAD, PAD, PAD],
                           [16, PAD, PAD, PAD]])
    ids = torch.cat([prompt, answer], 1)
    mask = (ids != PAD).long()
    values = value_model(ids, mask)
    scores = value_model.end_scores(ids, mask, prompt_length=3)
    expected_index = torch.tensor([5, 6, 2, 3])  # EOS; last of a full row; empty; one token
    torch.testing.assert_close(scores, values[torch.arange(4), expected_index])
    torch.testing.assert_close(scores, _dschat_end_scores(values, ids, 3, PAD))
    with pytest.raises(ValueError, match="prompt_length"):
        gather_end_values(values, mask, prompt_length=0)


def test_value_model_left_padding_invariance(model_dirs):
    value_model = build_value_model(model_dirs("llama_gqa_untied"), pad_token_id=PAD)
    ids = torch.randint(4, VOCAB, (1, 6))
    padded = torch.cat([torch.full((1, 2), PAD), ids], 1)
    mask = (padded != PAD).long()
    torch.testing.assert_close(value_model(padded, mask)[:, 2:],
                               value_model(ids, torch.ones_like(ids)), rtol=0, atol=1e-5)


def test_reward_model_saves_as_hf_and_critic_loads_it(model_dirs, tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    reward = build_value_model(model_dirs("opt_350m_shape"), pad_token_id=PAD)
    with torch.no_grad():
        reward.model.score.weight.normal_()
    save_hf(reward, tokenizer, str(tmp_path))
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(plain).__name__ == "OPTForSequenceClassification"
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == PAD
    critic = build_value_model(str(tmp_path))
    ids, mask = left_padded_prompts()
    torch.testing.assert_close(critic(ids, mask), reward(ids, mask), rtol=0, atol=1e-6)
    # HF's own forward scores the last non-pad token of right-padded input.
    right = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    right_mask = (right != PAD).long()
    torch.testing.assert_close(plain(input_ids=right, attention_mask=right_mask).logits[:, 0],
                               critic.end_scores(right, right_mask, prompt_length=1),
                               rtol=0, atol=1e-5)
    assert load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()


def test_value_model_rejects_multi_label():
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        ValueModel(transformers.GPT2ForSequenceClassification(config))


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("family", ["llama_gqa_tied", "opt_350m_shape", "gpt2"])
def test_lora_targets_follow_module_name(family, model_dirs):
    model = build_causal_lm(model_dirs(family))
    names = lora_target_names(model, LORA_MODULE_NAME[_family(family)])
    assert names and all(LORA_MODULE_NAME[_family(family)] in n for n in names)
    assert not any("lm_head" in n or "project_" in n for n in names)


@pytest.mark.parametrize("only_optimize", [True, False])
def test_lora_trainable_parameters_of_critic(only_optimize, model_dirs):
    critic = build_value_model(model_dirs("opt_350m_shape"), pad_token_id=PAD)
    apply_lora(critic, dim=4, alpha=8.0, module_name="decoder.layers.",
               only_optimize=only_optimize)
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 2 * 6 * 2  # A and B, 6 Linear per layer, 2 layers
    assert "model.score.weight" in trainable  # the critic's head always learns
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    if only_optimize:
        assert trainable == lora | {"model.score.weight"}
    else:
        assert "model.model.decoder.embed_tokens.weight" in trainable
        assert "model.model.decoder.layers.0.fc1.base_layer.bias" in trainable


def test_lora_only_optimize_freezes_actor_but_adapters(model_dirs):
    actor = build_causal_lm(model_dirs("llama_gqa_untied"))
    apply_lora(actor, dim=2, module_name="layers.", only_optimize=True)
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_lora_without_match_is_an_error(model_dirs):
    model = build_causal_lm(model_dirs("gpt2"))
    with pytest.raises(ValueError, match="no Linear module"):
        apply_lora(model, dim=2, module_name="decoder.layers.")


@pytest.mark.parametrize("family", ["llama_gqa_tied", "opt_350m_shape", "gpt2"])
def test_lora_merged_save_reloads_same_logits(family, model_dirs, tmp_path):
    model = build_causal_lm(model_dirs(family))
    apply_lora(model, dim=4, alpha=4.0, module_name=LORA_MODULE_NAME[_family(family)])
    with torch.no_grad():  # a trained adapter: B != 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids, mask = left_padded_prompts()
    before = causal_lm_logits(model, ids, mask)
    save_hf(model, None, str(tmp_path))
    reloaded = build_causal_lm(str(tmp_path))
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(causal_lm_logits(reloaded, ids, mask), before,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(causal_lm_logits(model, ids, mask), before, rtol=0, atol=0)
    plain = build_causal_lm(model_dirs(family))
    assert not torch.allclose(causal_lm_logits(plain, ids, mask), before, atol=1e-3)


def test_lora_value_model_merged_save(model_dirs, tmp_path):
    critic = build_value_model(model_dirs("llama_gqa_untied"), pad_token_id=PAD)
    apply_lora(critic, dim=4, module_name="layers.", only_optimize=True)
    with torch.no_grad():
        for name, param in critic.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids, mask = left_padded_prompts()
    save_hf(critic, None, str(tmp_path))
    torch.testing.assert_close(build_value_model(str(tmp_path))(ids, mask), critic(ids, mask),
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------ tokenizers, misc


def test_tokenizer_without_pad_gets_eos(tokenizer_dir_without_pad, caplog):
    with caplog.at_level(logging.WARNING, logger="torch_rlhf.models"):
        tokenizer = load_tokenizer(tokenizer_dir_without_pad)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "no pad token" in caplog.text
    assert tokenizer.padding_side == "right"


def test_tokenizer_end_of_conversation_token(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir, end_of_conversation_token="<|endoftext|>",
                               padding_side="left")
    assert len(tokenizer) == VOCAB + 1 and tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == VOCAB
    assert tokenizer.pad_token_id == PAD


def test_reward_tokenizer_check(tokenizer_dir, tokenizer_dir_without_pad):
    actor = load_tokenizer(tokenizer_dir)
    assert check_reward_tokenizer(actor, load_tokenizer(tokenizer_dir))
    other = load_tokenizer(tokenizer_dir_without_pad)
    with pytest.raises(ValueError, match="different vocabularies") as err:
        check_reward_tokenizer(actor, other)
    assert tokenizer_dir in str(err.value) and tokenizer_dir_without_pad in str(err.value)
    assert check_reward_tokenizer(actor, other, retokenize_for_reward=True) is False


def test_gather_params_for_is_a_no_op_without_zero3(model_dirs):
    model = build_causal_lm(model_dirs("gpt2"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with gather_params_for(model):
        pass
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
