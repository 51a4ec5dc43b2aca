"""`shared.model_limits`: the tokenizer within the embedding, the data lengths within the
context, read from inline configs and config.json with json only."""

from __future__ import annotations

import json

import pytest

from shared.config import ConfigError
from shared.data import DataConfig
from shared.model_limits import (
    ModelLimits,
    check_config_models,
    check_context,
    check_vocab,
    config_model_limits,
    read_model_limits,
)

DATA = DataConfig(max_seq_len=16, max_prompt_seq_len=8, max_answer_seq_len=8)


@pytest.mark.parametrize(
    "hf_config, vocab, context, key",
    [
        ({"model_type": "llama", "vocab_size": 32, "max_position_embeddings": 16}, 32, 16,
         "max_position_embeddings"),
        ({"model_type": "gpt2", "vocab_size": 64, "n_positions": 64}, 64, 64, "n_positions"),
        ({"model_type": "gpt2"}, 50257, 1024, "n_positions"),  # GPT2Config defaults
        ({"model_type": "opt"}, 50272, 2048, "max_position_embeddings"),  # OPTConfig defaults
        ({"model_type": "mystery"}, None, None, "max_position_embeddings"),
    ],
    ids=["llama", "gpt2", "gpt2-defaults", "opt-defaults", "unknown-type"],
)
def test_limits_from_a_hugging_face_config(hf_config, vocab, context, key):
    limits = ModelLimits.from_hf_config(hf_config, "here")
    assert (limits.vocab_size, limits.context, limits.context_key) == (vocab, context, key)


def test_tokenizer_larger_than_the_embedding_names_both_sizes_and_the_model():
    limits = ModelLimits("runs/x/sft/final", vocab_size=64, context=64)
    check_vocab(limits, 64, "actor")  # exactly full
    with pytest.raises(ConfigError) as err:
        check_vocab(limits, 70, "actor", "tok/dir")
    message = str(err.value)
    assert "the tokenizer tok/dir has 70 tokens" in message
    assert "actor model (runs/x/sft/final) has 64 token-embedding rows" in message
    assert "token ids 64..69 are out of range" in message
    assert "model.resize_token_embeddings(70)" in message


def test_an_inline_config_is_told_to_grow_its_vocab_size():
    limits = ModelLimits.from_hf_config({"model_type": "llama", "vocab_size": 16},
                                        "model.actor_config")
    with pytest.raises(ConfigError, match="token id 16 is out of range.*"
                                          "set model.actor_config.vocab_size >= 17"):
        check_vocab(limits, 17, "actor")


@pytest.mark.parametrize(
    "data, fragment",
    [
        (dict(max_seq_len=17), "data.max_seq_len = 17 exceeds"),
        (dict(max_prompt_seq_len=10),
         "data.max_prompt_seq_len + data.max_answer_seq_len = 10 + 8 = 18 exceeds"),
    ],
)
def test_lengths_beyond_the_context_name_the_keys(data, fragment):
    limits = ModelLimits("m", vocab_size=32, context=16)
    check_context(limits, DATA, "critic")
    with pytest.raises(ConfigError) as err:
        check_context(limits, DataConfig(**{**_sizes(DATA), **data}), "critic")
    assert fragment in str(err.value)
    assert "critic model (m: max_position_embeddings = 16)" in str(err.value)


def _sizes(data: DataConfig) -> dict:
    return dict(max_seq_len=data.max_seq_len, max_prompt_seq_len=data.max_prompt_seq_len,
                max_answer_seq_len=data.max_answer_seq_len)


def test_unknown_limits_check_nothing():
    check_context(ModelLimits("m", None, None), DataConfig(max_seq_len=10**6), "actor")
    check_vocab(ModelLimits("m", None, None), 10**6, "actor")


def test_read_model_limits_from_a_directory(tmp_path):
    assert read_model_limits(str(tmp_path)) is None  # no config.json (yet)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 40,
                                                      "max_position_embeddings": 12}))
    assert read_model_limits(str(tmp_path)) == ModelLimits(str(tmp_path), 40, 12)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the model config"):
        read_model_limits(str(tmp_path))


def test_read_model_limits_never_downloads():
    assert read_model_limits("nobody-here/not-a-cached-model") is None
    assert read_model_limits("runs/x/sft/final") is None


class _Model:
    def __init__(self, **fields):
        self.__dict__.update(dict(actor_model_name_or_path=None, critic_model_name_or_path=None,
                                  actor_config=None, critic_config=None), **fields)


class _Config:
    def __init__(self, data=DATA, **model):
        self.model, self.data = _Model(**model), data


def test_config_model_limits_follow_the_steps_model_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8,
                                                      "n_positions": 8}))
    inline = {"model_type": "llama", "vocab_size": 32, "max_position_embeddings": 16}
    both = _Config(actor_model_name_or_path=str(tmp_path), actor_config=inline)
    assert config_model_limits(both, "actor").source == str(tmp_path)  # the directory wins
    fresh = _Config(actor_config=inline)
    assert config_model_limits(fresh, "actor").source == "model.actor_config"
    assert config_model_limits(fresh, "critic") is None
    # a critic without a source of its own is a value head on the actor's directory
    on_actor = _Config(actor_model_name_or_path=str(tmp_path))
    assert config_model_limits(on_actor, "critic").context == 8


def test_check_config_models_covers_actor_critic_and_explicit_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8,
                                                      "n_positions": 64}))
    inline = {"model_type": "llama", "vocab_size": 32, "max_position_embeddings": 16}
    config = _Config(actor_config=inline, critic_config=inline)
    check_config_models(config, tokenizer_size=32)
    with pytest.raises(ConfigError, match="critic model"):
        check_config_models(_Config(actor_config=inline,
                                    critic_config={**inline, "vocab_size": 20}),
                            tokenizer_size=32)
    with pytest.raises(ConfigError, match=f"the trainer's model \\({tmp_path}\\)"):
        check_config_models(config, tokenizer_size=32, extra_paths=(str(tmp_path), None))
