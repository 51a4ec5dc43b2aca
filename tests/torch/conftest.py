"""Session fixtures for the torch tests: a tokenizer, saved tiny models, a gloo world.

Every model goes config -> ``save_pretrained`` -> our loaders' ``from_pretrained`` path;
nothing comes from the hub.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_hf import FAMILIES, build_tokenizer

# One intra-op thread, as torchrun / the deepspeed launcher give each worker: the models
# are tiny and the machine is shared, where extra threads only spin.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 64-token word-level tokenizer with <pad>=0, <s>=1, </s>=2."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(with_pad=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir_without_pad(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer_no_pad")
    build_tokenizer(with_pad=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> directory of a saved, randomly initialised causal LM (built on demand)."""
    from torch_rlhf.models import build_causal_lm

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            torch.manual_seed(0)
            model = build_causal_lm(config_dict=FAMILIES[family])
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def distributed():
    """A one-process gloo world (free port), shared by every DeepSpeed test."""
    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A tokenised-data cache shared by every trainer test (``data.cache_dir``)."""
    return str(tmp_path_factory.mktemp("data_cache"))
