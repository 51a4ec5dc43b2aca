"""Fixtures every test tree shares (a fixture, not a helper module, so a test under any
folder reaches it however pytest was started)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "configs" / "demo" / "tokenizer"


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a port for a server a test starts (`rlhf serve`, `rlhf launch`)."""
    return _free_port


def _reward_tokenizer(out: Path) -> Path:
    """The demo's character tokenizer with its characters' ids reversed and a BOS template:
    a vocabulary of its own (same texts, other ids, one more token per text)."""
    spec = json.loads((DEMO_TOKENIZER / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    chars = sorted((w for w, i in vocab.items() if i >= 4), key=vocab.get)
    spec["model"]["vocab"] = {**{w: i for w, i in vocab.items() if i < 4},
                              **{w: 4 + k for k, w in enumerate(reversed(chars))}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text((DEMO_TOKENIZER / "tokenizer_config.json")
                                               .read_text())
    return out


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> dict[str, str]:
    """Directories of a tiny random causal LM (``policy``) and reward model (``reward``) of
    configs/demo.yaml's shape with its tokenizer, and a second tokenizer (``tokenizer``, a
    vocabulary of its own) for the served-role tests; nothing is downloaded."""
    import transformers

    from shared.config import load_config

    out = tmp_path_factory.mktemp("served-models")
    hf = dict(load_config(ROOT / "configs" / "demo.yaml", []).model.actor_config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    paths = {"tokenizer": str(_reward_tokenizer(out / "reward-tokenizer"))}
    for name, auto, extra in (("policy", transformers.AutoModelForCausalLM, {}),
                              ("reward", transformers.AutoModelForSequenceClassification,
                               {"num_labels": 1})):
        transformers.set_seed(11)
        model = auto.from_config(transformers.AutoConfig.for_model(**hf, **extra))
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


@pytest.fixture(scope="session")
def in_process_ppo(served_models, tmp_path_factory) -> Callable[[str], Any]:
    """``in_process_ppo(backend)``: the PPO step of tests/served_runs.py run in process on
    ``served_models``, once a session per backend: what every served run must equal."""
    from served_runs import run_ppo

    runs: dict[str, Any] = {}

    def run(backend: str):
        if backend not in runs:
            runs[backend] = run_ppo(backend, served_models,
                                    tmp_path_factory.mktemp(f"in-process-{backend}"))
        return runs[backend]

    return run
