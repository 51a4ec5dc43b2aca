"""A reward model with its own vocabulary, served (issue 12): the loop sends the rollout's text
(``score_text``, `shared.reward_text`), the server re-encodes it with its tokenizer, and the
run equals the torch backend's in-process re-tokenising run; both backends' handlers score the
same text alike; the client checks the server's tokenizer is the one the config names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers
from served_runs import assert_same_run, config, role_handler, run_ppo

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 2e-5  # parity_tests/tolerances.py: fp32 forwards


@pytest.fixture(scope="module")
def models(served_models):
    """Tiny random policy and reward model, and the reward tokenizer (tests/conftest.py)."""
    return served_models


def _config(models, *extra):
    return config(f"model.reward_tokenizer_name_or_path={models['tokenizer']}",
                  "model.retokenize_for_reward=true", *extra)


def test_the_reward_tokenizer_is_another_vocabulary(models):
    from shared.reward_text import encode_reward_texts, load_reward_tokenizer
    from shared.serving.protocol import tokenizer_fingerprint

    config = _config(models)
    theirs = load_reward_tokenizer(config)
    ours = transformers.AutoTokenizer.from_pretrained(ROOT / "configs/demo/tokenizer")
    assert tokenizer_fingerprint(theirs) != tokenizer_fingerprint(ours)
    ids, mask = encode_reward_texts(theirs, ["12+7=19", "3+4="])
    # BOS, '3' '+' '4' '=' under reversed ids (the demo's are 7 14 8 15), EOS; right-padded
    assert ids[1].tolist() == [1, 13, 6, 12, 5, 2, 0, 0, 0]
    assert mask.sum(1).tolist() == [9, 6]


def test_torch_and_jax_handlers_score_the_same_text(models):
    from jax_rlhf.serving import JaxRoleHandler
    from shared.reward_text import load_reward_tokenizer
    from shared.serving.protocol import tokenizer_fingerprint
    from torch_rlhf.serving import TorchRoleHandler

    config = _config(models)
    texts = ["12+7=19", "3+4=8", "1+1=", "40+2=42 "]
    torch_handler = TorchRoleHandler("reward", models["reward"], config)
    jax_handler = JaxRoleHandler("reward", models["reward"], config)
    expected = tokenizer_fingerprint(load_reward_tokenizer(config))
    assert torch_handler.identity["tokenizer_sha256"] == expected
    assert jax_handler.identity["tokenizer_sha256"] == expected
    a = torch_handler.call("score_text", {}, {"texts": texts})["scores"]
    b = jax_handler.call("score_text", {}, {"texts": texts})["scores"]
    assert a.shape == b.shape == (4,) and a.dtype == b.dtype == np.float32
    assert len(set(a.tolist())) == 4  # the texts are told apart
    np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    # a row's score does not depend on the rows beside it (padding never matters)
    alone = torch_handler.call("score_text", {}, {"texts": texts[2:3]})["scores"]
    np.testing.assert_allclose(alone, a[2:3], atol=1e-6, rtol=0)


def _ppo(backend, models, run_dir, overrides=()):
    return run_ppo(backend, models, run_dir, run_config=_config(models, *overrides))


def _served_ppo(backend, server_backend, models, run_dir):
    from shared.serving import ServerThread

    with ServerThread(role_handler(server_backend, "reward", models["reward"],
                                   _config(models))) as reward:
        return _ppo(backend, models, run_dir, [f"ppo.reward_model.url={reward.url}"])


def test_a_served_text_reward_gives_the_in_process_retokenising_run(models, tmp_path):
    """torch actor: in process (engine.reward_tokenizer) == served (score_text)."""
    in_process = _ppo("torch", models, tmp_path / "in-process")
    served = _served_ppo("torch", "torch", models, tmp_path / "served")
    assert_same_run(in_process, served)
    assert any(m.startswith("reward_model@http://127.0.0.1:") for m in served.entry["models"])
    assert all(m["reward_score"] != 0 for m in served.metrics)


@pytest.mark.slow
def test_a_jax_actor_scores_text_on_either_backends_server(models, tmp_path):
    """The JAX backend has no in-process re-tokenising reward model; served, a JAX actor's run
    is the same whichever backend's server re-encodes its text."""
    assert_same_run(_served_ppo("jax", "jax", models, tmp_path / "jax-server"),
                    _served_ppo("jax", "torch", models, tmp_path / "torch-server"))
