"""The torch backend refuses a tokenizer larger than a model's embedding (never resizes), with
the message `shared.model_limits` gives the JAX backend too."""

from __future__ import annotations

import pytest
import yaml
from rlhf_configs import DEMO, DEMO_TOKENIZER, write_config

from shared.config import ConfigError
from shared.model_limits import ModelLimits, check_vocab

# the demo's actor with 16 embedding rows; the demo tokenizer has 17 tokens
SMALL_EMBEDDING = {"model": {"actor_config": {
    **yaml.safe_load(DEMO.read_text())["model"]["actor_config"], "vocab_size": 16}}}


def expected_message(config) -> str:
    limits = ModelLimits.from_hf_config(config.model.actor_config, "model.actor_config")
    with pytest.raises(ConfigError) as err:
        check_vocab(limits, 17, "actor", str(DEMO_TOKENIZER))
    return str(err.value)


def test_tokenizer_larger_than_the_embedding_stops_the_trainer(tmp_path, distributed,
                                                               data_cache):
    from torch_rlhf.sft import SFTTrainer

    overrides = {**SMALL_EMBEDDING, "data": {"cache_dir": data_cache}}
    _, config = write_config(tmp_path, overrides)
    assert config.model.actor_config["vocab_size"] == 16
    with pytest.raises(ConfigError) as err:
        SFTTrainer(config, run_dir=tmp_path / "run")
    assert str(err.value) == expected_message(config)
    assert "17 tokens" in str(err.value) and "16 token-embedding rows" in str(err.value)
