"""Config: YAML loading, overrides, aliases, validation and round trips."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from shared.config import (
    DSCHAT_ARGS,
    NEMO_PPO_KEYS,
    ConfigError,
    RLHFConfig,
    config_from_dict,
    load_config,
    save_config,
)
from shared.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
MINIMAL = {"model": {"actor_model_name_or_path": "some/actor"}}


def _key_exists(dotted: str) -> bool:
    """True when ``dotted`` names a field path of RLHFConfig."""
    cls = RLHFConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        hint = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = args[0] if args and dataclasses.is_dataclass(args[0]) else hint
    return True


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    out = tmp_path / "snapshot.yaml"
    save_config(config, out)
    assert load_config(out) == config


def test_defaults_round_trip(tmp_path):
    config = config_from_dict(MINIMAL)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_generation_batch_not_divisible_names_both_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, ["ppo.per_device_generation_batch_size=6",
                                   "ppo.per_device_training_batch_size=4"])
    message = str(err.value)
    assert "ppo.per_device_generation_batch_size" in message
    assert "6" in message and "per_device_training_batch_size=4" in message


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"ppo: unknown key\(s\) ppo_epoch;.*ppo_epochs"):
        config_from_dict(MINIMAL, ["ppo.ppo_epoch=2"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"ppo.ppo_epochs: expected an integer, got 'two'"):
        config_from_dict(MINIMAL, ["ppo.ppo_epochs=two"])


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"engine.torch.actor_zero_stage: 4 is not allowed.*3"):
        config_from_dict(MINIMAL, ["engine.torch.actor_zero_stage=4"])


def test_nested_post_init_error_is_prefixed():
    with pytest.raises(ConfigError, match=r"ppo.sampling.*temperature: 0.0 is invalid"):
        config_from_dict(MINIMAL, ["ppo.sampling.temperature=0"])


def test_missing_actor_is_an_error():
    with pytest.raises(ConfigError, match="model.actor_model_name_or_path"):
        config_from_dict({"model": {}})


FRESH = {"model_type": "llama", "vocab_size": 32}


@pytest.mark.parametrize(("model", "source"), [
    ({"actor_model_name_or_path": "base", "critic_model_name_or_path": "rm"}, ("rm", None)),
    ({"actor_model_name_or_path": "base", "critic_config": FRESH}, (None, FRESH)),
    ({"actor_model_name_or_path": "base"}, ("base", None)),  # DS-Chat: a base model
    ({"actor_config": FRESH, "critic_model_name_or_path": "rm"}, ("rm", None)),
], ids=["critic_path", "critic_config", "actor_base_model", "fresh_actor_named_critic"])
def test_reward_model_source_is_one_rule(model, source):
    from shared.supervised_loop import model_source

    config = config_from_dict({"model": model})
    assert config.model.reward_model_source() == source
    assert model_source(config, "reward") == source


def test_no_reward_model_source_is_an_error_at_load():
    # a fresh actor is no base model to start the reward model from
    with pytest.raises(ConfigError, match=r"model.critic_model_name_or_path: null is invalid.*"
                                          r"model.critic_config"):
        config_from_dict({"model": {"actor_config": FRESH}})


def test_dotted_override_and_scientific_notation():
    config = config_from_dict(MINIMAL, ["ppo.actor_optim.learning_rate=1e-5", "seed=7"])
    assert config.ppo.actor_optim.learning_rate == 1e-5
    assert config.seed == 7


def test_deepspeed_chat_argument_names_as_overrides():
    config = config_from_dict(MINIMAL, [
        "actor_zero_stage=3", "--offload_reference_model=true", "enable_hybrid_engine=true",
        "only_optimize_lora=true", "actor_lora_dim=8", "critic_lora_dim=4",
        "num_warmup_steps=5", "data_path=[a.json, b.json]",
    ])
    assert config.engine.torch.actor_zero_stage == 3
    assert config.ppo.offload_reference_model is True
    assert config.engine.torch.hybrid_engine == "on"
    assert config.ppo.actor.lora.only_optimize and config.ppo.critic.lora.only_optimize
    assert config.ppo.actor_optim.num_warmup_steps == config.ppo.critic_optim.num_warmup_steps == 5
    assert [d.path for d in config.data.datasets] == ["a.json", "b.json"]


def test_nemo_keys_in_yaml_ppo_section(tmp_path):
    path = tmp_path / "nemo.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "ppo": {
        "preset": "nemo", "entropy_penalty": 0.01, "initial_policy_kl_penalty": 0.02,
        "ratio_eps": 0.1, "discount": 0.99, "gae_lambda": 0.9, "normalize_advantage": True,
        "epochs": 2, "rollout_micro_batch_size": 8, "use_greedy": True,
        "per_device_training_batch_size": 4}}))
    config = load_config(path)
    c = config.ppo.conventions
    assert (c.entropy_coef, c.kl_coef, c.clip_low, c.gamma, c.lam) == (0.01, 0.02, 0.1, 0.99, 0.9)
    assert c.whiten_advantages is True
    assert config.ppo.ppo_epochs == 2
    assert config.ppo.per_device_generation_batch_size == 8
    assert config.ppo.sampling.do_sample is False


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_selects_conventions_and_overrides_apply(name):
    # rloo's leave-one-out baseline needs two answers per prompt
    group = ["ppo.n_samples_per_prompt=2"] if name == "rloo" else []
    config = config_from_dict(MINIMAL, [f"ppo.preset={name}", "ppo.conventions.gamma=0.5",
                                        *group])
    expected = dataclasses.replace(PRESETS[name], gamma=0.5)
    assert config.ppo.conventions == expected


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="ppo.preset.*deepspeed_chat"):
        config_from_dict(MINIMAL, ["ppo.preset=nope"])


# Arguments in the DeepSpeed-Chat step-3 README table (../shared/seeds) and the
# other step-3 knobs the project promises a home for.
DSCHAT_README_TABLE = [
    "unsupervised_dataset_name", "unsupervised_dataset_config_name", "unsup_coef",
    "per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
    "ppo_epochs", "max_prompt_seq_len", "max_answer_seq_len", "enable_hybrid_engine",
    "inference_tp_size", "release_inference_cache", "unpin_actor_parameters",
    "offload_reference_model", "enable_ema", "actor_lora_dim", "actor_lora_module_name",
    "critic_lora_dim", "only_optimize_lora", "actor_zero_stage", "critic_zero_stage",
    "actor_gradient_checkpointing", "disable_actor_dropout", "actor_learning_rate",
    "critic_learning_rate", "lr_scheduler_type", "data_split",
]
NEMO_TABLE = [
    "entropy_penalty", "initial_policy_kl_penalty", "epochs", "num_rollout_samples",
    "rollout_micro_batch_size", "ratio_eps", "discount", "gae_lambda", "normalize_advantage",
    "temperature", "top_k", "top_p", "use_greedy",
    # NeMo-Aligner's spellings of the same knobs.
    "entropy_bonus", "discount_factor", "normalize_advantages", "use_absolute_kl", "loss_clip_val",
]


@pytest.mark.parametrize("arg", DSCHAT_README_TABLE)
def test_every_deepspeed_chat_argument_has_a_home(arg):
    assert arg in DSCHAT_ARGS
    for target in DSCHAT_ARGS[arg].targets:
        assert _key_exists(target), target


@pytest.mark.parametrize("key", NEMO_TABLE)
def test_every_nemo_key_has_a_home(key):
    assert key in NEMO_PPO_KEYS
    for target in NEMO_PPO_KEYS[key].targets:
        assert _key_exists(target), target


def test_base_inheritance_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        **MINIMAL, "seed": 1, "ppo": {"ppo_epochs": 3}, "eval": {"dataset": "./eval.jsonl"}}))
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../base.yaml\nseed: 2\nppo: {generation_batches: 2}\n")
    config = load_config(tmp_path / "sub" / "child.yaml")
    assert config.seed == 2
    assert (config.ppo.ppo_epochs, config.ppo.generation_batches) == (3, 2)
    assert config.eval.dataset == str(tmp_path / "eval.jsonl")


def test_base_loop_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(path)


def test_config_is_frozen():
    config = config_from_dict(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_config_reference_is_current():
    from shared.config.reference import render

    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == render(), "run: python -m shared.config.reference > docs/config.md"


def test_every_schema_field_is_documented():
    from shared.config.reference import field_docs

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for name, doc in field_docs(cls).items():
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint)
            else:
                yield f"{cls.__name__}.{name}", doc

    undocumented = [key for key, doc in walk(RLHFConfig) if not doc]
    assert undocumented == []


def test_presets_table_in_docs_is_current():
    from shared.config.reference import BEGIN_PRESETS, END_PRESETS, render_presets

    text = (REPO / "docs" / "conventions.md").read_text()
    table = text.split(BEGIN_PRESETS + "\n", 1)[1].split(END_PRESETS, 1)[0]
    assert table == render_presets(), "regenerate: python -m shared.config.reference presets"
