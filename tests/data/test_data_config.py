"""DataConfig / DatasetSpec: defaults, validation messages, from_dict."""

import dataclasses

import pytest

from shared.data import DataConfig, DatasetSpec
from shared.data.config import parse_data_split


def test_defaults_follow_deepspeed_chat():
    config = DataConfig()
    assert config.data_split == "2,4,4"
    assert config.step_shares == pytest.approx((0.2, 0.4, 0.4))
    assert (config.max_seq_len, config.max_prompt_seq_len, config.max_answer_seq_len) == (
        512,
        256,
        256,
    )
    assert config.shuffle_seed == 1234
    assert config.end_of_conversation_token is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_seq_len = 3


@pytest.mark.parametrize(
    ("data_split", "shares"),
    [("2,4,4", (0.2, 0.4, 0.4)), ("10,0,0", (1.0, 0.0, 0.0)), (" 1, 1 ,2", (0.25, 0.25, 0.5))],
    ids=["dschat", "sft_only", "spaces"],
)
def test_parse_data_split(data_split, shares):
    assert parse_data_split(data_split) == pytest.approx(shares)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data_split", "2,4"),
        ("data_split", "a,b,c"),
        ("data_split", "0,0,0"),
        ("data_split", "-1,2,2"),
        ("eval_fraction", 1.0),
        ("eval_fraction", -0.1),
        ("max_seq_len", 0),
        ("max_seq_len", 1),
        ("max_prompt_seq_len", 2.5),
        ("max_answer_seq_len", True),
        ("end_of_conversation_token", ""),
        ("prompt_response_separator", ""),
        ("shuffle_seed", -1),
        ("num_padding_at_beginning", -1),
        ("train_on_prompt", "yes"),
        ("cache_dir", ""),
        ("datasets", "a.jsonl"),
        ("datasets", ("a.jsonl",)),
    ],
)
def test_data_config_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        DataConfig(**{field: value})
    assert field in str(err.value)
    assert repr(value)[:10] in str(err.value) or field.startswith("datasets")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": ""}, "path"),
        ({"path": "x", "format": "csv"}, "format"),
        ({"path": "x", "hf_split": ""}, "hf_split"),
        ({"path": "x", "weight": 0}, "weight"),
        ({"path": "x", "weight": "1"}, "weight"),
        ({"path": "x", "steps": ("sft", "rm")}, "steps"),
        ({"path": "x", "steps": ()}, "steps"),
        ({"path": "x", "steps": "sft"}, "steps"),
        ({"path": "x", "steps": ("sft", "sft")}, "steps"),
        ({"path": "x", "adapter": "nope/none"}, "adapter"),
        ({"path": "x", "adapter": "Anthropic/hh-rlhf", "format": "pairwise"}, "format"),
        ({"path": "x", "eval_only": 1}, "eval_only"),
    ],
)
def test_dataset_spec_errors_name_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DatasetSpec.{field}"):
        DatasetSpec(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(ValueError) as err:
        DatasetSpec(path="x", format="csv")
    assert "'csv'" in str(err.value) and "nemo_comparison" in str(err.value)


def test_from_dict_builds_nested_specs():
    config = DataConfig.from_dict(
        {
            "datasets": [
                "Dahoas/rm-static",
                {"path": "local.jsonl", "format": "sft", "steps": ["sft"], "weight": 2},
            ],
            "data_split": "2,4,4",
            "max_seq_len": 64,
        }
    )
    assert config.datasets[0] == DatasetSpec(path="Dahoas/rm-static")
    assert config.datasets[1].steps == ("sft",)
    assert config.datasets[1].weight == 2
    assert config.max_seq_len == 64


def test_from_dict_single_dataset_string():
    assert DataConfig.from_dict({"datasets": "a.jsonl"}).datasets == (DatasetSpec("a.jsonl"),)


def test_from_dict_unknown_keys_are_named_with_allowed_ones():
    with pytest.raises(ValueError) as err:
        DataConfig.from_dict({"max_seq_length": 3, "datset": []})
    message = str(err.value)
    assert "datset, max_seq_length" in message
    assert "allowed:" in message and "max_seq_len" in message


def test_from_dict_unknown_dataset_key():
    with pytest.raises(ValueError, match="DatasetSpec: unknown key.*split.*allowed:.*hf_split"):
        DataConfig.from_dict({"datasets": [{"path": "a", "split": "test"}]})


def test_from_dict_round_trips_asdict():
    config = DataConfig(
        datasets=(DatasetSpec("a.jsonl", steps=("reward", "ppo")),), eval_fraction=0.2
    )
    assert DataConfig.from_dict(dataclasses.asdict(config)) == config
