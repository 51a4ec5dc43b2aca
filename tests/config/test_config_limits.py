"""Config validation of non-finite and absurd numbers, and of the data lengths against the
models' context at load time (`shared.model_limits`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import ConfigError, config_from_dict, load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

MINIMAL = {"model": {"actor_model_name_or_path": "some/actor"}}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "max_position_embeddings": 16}


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("sft.optim.learning_rate=inf", "sft.optim.learning_rate", "finite number in (0, 1]"),
        ("sft.optim.learning_rate=nan", "sft.optim.learning_rate", "finite number in (0, 1]"),
        ("sft.optim.learning_rate=1e6", "sft.optim.learning_rate", "finite number in (0, 1]"),
        ("sft.optim.learning_rate=0", "sft.optim.learning_rate", "finite number in (0, 1]"),
        ("ppo.actor_optim.learning_rate=-1e-5", "ppo.actor_optim.learning_rate", "(0, 1]"),
        ("reward.optim.weight_decay=inf", "reward.optim.weight_decay", "[0, 1]"),
        ("reward.optim.weight_decay=2", "reward.optim.weight_decay", "[0, 1]"),
        ("sft.optim.eps=0", "sft.optim.eps", "(0, 1]"),
        ("sft.optim.eps=nan", "sft.optim.eps", "(0, 1]"),
        ("sft.optim.max_grad_norm=inf", "sft.optim.max_grad_norm", "0 disables clipping"),
        ("sft.optim.max_grad_norm=nan", "sft.optim.max_grad_norm", ">= 0"),
        ("sft.optim.max_grad_norm=-1", "sft.optim.max_grad_norm", ">= 0"),
        ("sft.optim.betas=[0.9, .nan]", "sft.optim.betas", "[0, 1)"),
        ("sft.optim.betas=[0.9, 1.0]", "sft.optim.betas", "[0, 1)"),
        ("sft.optim.min_lr_ratio=nan", "sft.optim.min_lr_ratio", "[0, 1]"),
        ("ppo.unsup_coef=inf", "ppo.unsup_coef", "finite number >= 0"),
        ("ppo.unsup_coef=nan", "ppo.unsup_coef", "finite number >= 0"),
        ("ppo.ema_beta=nan", "ppo.ema_beta", "(0, 1)"),
        ("ppo.ema_beta=1", "ppo.ema_beta", "(0, 1)"),
        ("ppo.sampling.temperature=inf", "ppo.sampling.temperature", "finite number > 0"),
        ("ppo.sampling.temperature=0", "ppo.sampling.temperature", "finite number > 0"),
        ("ppo.actor.lora.alpha=inf", "ppo.actor.lora.alpha", "finite number > 0"),
        ("ppo.actor.lora.learning_rate=inf", "ppo.actor.lora.learning_rate", "or null"),
        ("reward.margin=inf", "reward.margin", "finite number or null"),
        ("ppo.conventions.kl_coef=inf", "kl_coef", "a finite number >= 0"),
        ("ppo.conventions.entropy_coef=nan", "entropy_coef", "a finite number >= 0"),
        ("data.data_split=nan,1,1", "data_split", "finite non-negative"),
        ("data.data_split=inf,1,1", "data_split", "finite non-negative"),
        ("data.max_truncated_fraction=1.5", "max_truncated_fraction", "[0, 1]"),
        ("data.max_unk_fraction=nan", "max_unk_fraction", "[0, 1]"),
        ("data.max_dropped_fraction=-0.1", "max_dropped_fraction", "[0, 1]"),
        ("data.max_line_bytes=0", "max_line_bytes", "positive integer"),
    ],
)
def test_non_finite_and_absurd_numbers_name_key_and_range(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, [override])
    message = str(err.value)
    assert key in message and allowed in message, message


def test_infinite_dataset_weight_is_refused():
    with pytest.raises(ConfigError, match="weight.*finite positive number"):
        config_from_dict({**MINIMAL, "data": {"datasets": [{"path": "a.jsonl",
                                                            "weight": float("inf")}]}})


@pytest.mark.parametrize("override", ["sft.optim.learning_rate=1", "sft.optim.max_grad_norm=0",
                                      "sft.optim.weight_decay=1", "ppo.unsup_coef=0",
                                      "data.max_truncated_fraction=1"])
def test_range_edges_are_accepted(override):
    config_from_dict(MINIMAL, [override])


def _inline(**data) -> dict:
    return {"model": {"actor_config": TINY_LLAMA, "critic_config": TINY_LLAMA,
                      "tokenizer_name_or_path": "tok"},
            "data": {"max_seq_len": 16, "max_prompt_seq_len": 8, "max_answer_seq_len": 8,
                     **data}}


def test_prompt_plus_answer_beyond_the_context_names_the_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_inline(max_prompt_seq_len=12))
    message = str(err.value)
    assert "data.max_prompt_seq_len + data.max_answer_seq_len = 12 + 8 = 20" in message
    assert "actor model (model.actor_config: max_position_embeddings = 16)" in message


def test_max_seq_len_beyond_the_context_names_the_key():
    with pytest.raises(ConfigError, match=r"data.max_seq_len = 17 exceeds .*critic model"):
        config_from_dict({**_inline(max_seq_len=17),
                          "model": {"actor_model_name_or_path": "some/actor",
                                    "critic_config": TINY_LLAMA}})


def test_lengths_that_fit_load():
    config = config_from_dict(_inline())
    assert config.data.max_prompt_seq_len + config.data.max_answer_seq_len == 16


def test_inline_config_without_context_takes_the_transformers_default():
    llama = {k: v for k, v in TINY_LLAMA.items() if k != "max_position_embeddings"}
    model = {"actor_config": llama, "critic_config": llama, "tokenizer_name_or_path": "t"}
    config_from_dict({"model": model, "data": {"max_seq_len": 2048}})
    with pytest.raises(ConfigError, match="max_position_embeddings = 2048"):
        config_from_dict({"model": model, "data": {"max_seq_len": 2049}})


def test_model_directory_context_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 64, "n_positions": 64}))
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"actor_model_name_or_path": str(tmp_path)},
                          "data": {"max_seq_len": 65}})
    assert f"({tmp_path}: n_positions = 64)" in str(err.value)
    config_from_dict({"model": {"actor_model_name_or_path": str(tmp_path)},
                      "data": {"max_seq_len": 64, "max_prompt_seq_len": 32,
                               "max_answer_seq_len": 32}})


def test_unreadable_models_are_left_to_the_trainers():
    # a hub name that is not cached, a directory a pipeline step writes later
    config_from_dict({"model": {"actor_model_name_or_path": "nobody/not-cached",
                                "critic_model_name_or_path": "runs/x/reward/final"},
                      "data": {"max_seq_len": 10**6}})


def test_demo_config_fits_its_models():
    config = load_config(DEMO)
    assert config.model.actor_config["max_position_embeddings"] == 16
