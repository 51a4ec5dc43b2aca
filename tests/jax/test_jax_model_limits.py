"""The JAX backend refuses a tokenizer larger than a model's embedding (it would read NaN
there and train every weight to NaN), with the message `shared.model_limits` gives the torch
backend too."""

from __future__ import annotations

import pytest
from jax_tiny_runs import REPO, TINY_LLAMA, tiny_run

from shared.config import ConfigError, load_config
from shared.model_limits import ModelLimits, check_vocab

DEMO_TOKENIZER = REPO / "configs" / "demo" / "tokenizer"


def test_tokenizer_larger_than_the_embedding_stops_the_trainer(tmp_path):
    import yaml

    from jax_rlhf.train.sft import SFTTrainer

    path = tmp_path / "config.yaml"
    small = {**TINY_LLAMA, "vocab_size": 16}  # the demo tokenizer has 17 tokens
    path.write_text(yaml.safe_dump(tiny_run(model={"actor_config": small})))
    config = load_config(path)
    with pytest.raises(ConfigError) as err:
        SFTTrainer(config, run_dir=tmp_path / "run")
    limits = ModelLimits.from_hf_config(small, "model.actor_config")
    with pytest.raises(ConfigError) as expected:
        check_vocab(limits, 17, "actor", str(DEMO_TOKENIZER))
    assert str(err.value) == str(expected.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written
