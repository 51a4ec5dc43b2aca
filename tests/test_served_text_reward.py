"""A reward model with its own vocabulary, served (issue 12): the loop sends the rollout's text
(``score_text``, `shared.reward_text`), the server re-encodes it with its tokenizer, and the
run equals the torch backend's in-process re-tokenising run; both backends' handlers score the
same text alike; the client checks the server's tokenizer is the one the config names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from shared.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ["ppo.per_device_generation_batch_size=8", "ppo.per_device_training_batch_size=4",
        "ppo.max_iterations=2", "ppo.unsup_coef=0", "eval.max_prompts=8",
        "eval.samples_per_prompt=1", "logging.progress_bar=false", "logging.plots=false"]
TOLERANCE = 2e-5  # parity_tests/tolerances.py: fp32 forwards / whole PPO iterations


@pytest.fixture(scope="module")
def models(served_models):
    """Tiny random policy and reward model, and the reward tokenizer (tests/conftest.py)."""
    return served_models


def _config(models, *extra):
    return load_config(DEMO, [*TINY, f"model.reward_tokenizer_name_or_path={models['tokenizer']}",
                              "model.retokenize_for_reward=true", *extra])


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
    from shared.pipeline import run_command

    summary = run_command(backend, "ppo", _config(models, *overrides), run_dir,
                          actor=models["policy"], critic=models["reward"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(Path(summary["ppo"]["final_model"]) / "model.safetensors"))
    return summary["ppo"], [m for m in metrics if m.get("step") == "ppo"], weights


def _served_ppo(backend, server_backend, models, run_dir):
    from shared.serving import ServerThread

    if server_backend == "torch":
        from torch_rlhf.serving import TorchRoleHandler as Handler
    else:
        from jax_rlhf.serving import JaxRoleHandler as Handler
    with ServerThread(Handler("reward", models["reward"], _config(models))) as reward:
        return _ppo(backend, models, run_dir, [f"ppo.reward_model.url={reward.url}"])


def _same_run(a, b):
    (entry_a, metrics_a, weights_a), (entry_b, metrics_b, weights_b) = a, b
    assert len(metrics_a) == len(metrics_b) == 2
    for ma, mb in zip(metrics_a, metrics_b, strict=True):
        for key in ("reward_score", "kl", "actor_loss", "critic_loss", "approx_kl"):
            assert abs(ma[key] - mb[key]) <= TOLERANCE * max(1.0, abs(ma[key])), key
    assert weights_a.keys() == weights_b.keys()
    worst = max(float(np.abs(weights_a[k] - weights_b[k]).max()) for k in weights_a)
    assert worst <= 1e-5, worst
    assert entry_a["heldout"] == pytest.approx(entry_b["heldout"], abs=1e-9)


def test_a_served_text_reward_gives_the_in_process_retokenising_run(models, tmp_path):
    """torch actor: in process (engine.reward_tokenizer) == served (score_text)."""
    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed()  # a world of one, as `rlhf` starts the torch backend
    in_process = _ppo("torch", models, tmp_path / "in-process")
    served = _served_ppo("torch", "torch", models, tmp_path / "served")
    _same_run(in_process, served)
    assert any(m.startswith("reward_model@http://127.0.0.1:") for m in served[0]["models"])
    assert all(m["reward_score"] != 0 for m in served[1])


@pytest.mark.slow
def test_a_jax_actor_scores_text_on_either_backends_server(models, tmp_path):
    """The JAX backend has no in-process re-tokenising reward model; served, a JAX actor's run
    is the same whichever backend's server re-encodes its text."""
    _same_run(_served_ppo("jax", "jax", models, tmp_path / "jax-server"),
              _served_ppo("jax", "torch", models, tmp_path / "torch-server"))
