"""Typed, frozen configuration: schema, YAML loading, overrides, aliases."""

from shared.config._build import ConfigError, to_dict
from shared.config.aliases import DSCHAT_ARGS, DSCHAT_STEP_ARGS, NEMO_PPO_KEYS
from shared.config.loader import (
    config_from_dict,
    config_keys,
    foreign_engine_keys,
    load_config,
    parse_override,
    save_config,
)
from shared.config.schema import (
    EngineConfig,
    EvalConfig,
    JaxEngineConfig,
    LoggingConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    ModuleConfig,
    OptimizerConfig,
    PPOConfig,
    RewardConfig,
    RLHFConfig,
    SamplingConfig,
    SFTConfig,
    TorchEngineConfig,
)

__all__ = [
    "ConfigError",
    "DSCHAT_ARGS",
    "DSCHAT_STEP_ARGS",
    "EngineConfig",
    "EvalConfig",
    "JaxEngineConfig",
    "LoRAConfig",
    "LoggingConfig",
    "MeshConfig",
    "ModelConfig",
    "ModuleConfig",
    "NEMO_PPO_KEYS",
    "OptimizerConfig",
    "PPOConfig",
    "RLHFConfig",
    "RewardConfig",
    "SFTConfig",
    "SamplingConfig",
    "TorchEngineConfig",
    "config_from_dict",
    "config_keys",
    "foreign_engine_keys",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
]
