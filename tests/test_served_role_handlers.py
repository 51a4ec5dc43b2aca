"""The two backends' served-role handlers compute the same numbers on the same exported
models (so a client of either backend can use a server of either), and a torch server
answers over HTTP exactly what its handler computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

from shared.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TOLERANCE = 2e-5  # fp32 forwards of two frameworks (parity_tests/tolerances.py: logits)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random causal LM and reward model of the demo's shape, with its tokenizer."""
    out = tmp_path_factory.mktemp("served")
    config = load_config(DEMO, [])
    hf = dict(config.model.actor_config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "configs/demo/tokenizer")
    built = {}
    for name, auto, extra in (("policy", transformers.AutoModelForCausalLM, {}),
                              ("reward", transformers.AutoModelForSequenceClassification,
                               {"num_labels": 1})):
        cfg = transformers.AutoConfig.for_model(**hf, **extra)
        transformers.set_seed(7)
        model = auto.from_config(cfg)
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        built[name] = str(path)
    return config, built


def _rollout(seed=0, batch=3, prompt=6, answer=4, vocab=17):
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(3, vocab, (batch, prompt))
    prompt_mask = np.ones((batch, prompt), np.int64)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = 0
    response = rng.integers(3, vocab, (batch, answer))
    sample_mask = np.ones((batch, answer), np.int64)
    sample_mask[1, 2:] = 0  # ended early
    response[1, 2:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response": response,
            "sample_mask": sample_mask}


@pytest.mark.parametrize(("role", "model", "endpoint", "key", "shape"), [
    ("reward", "reward", "score", "scores", (3,)),
    ("critic", "reward", "values", "values", (3, 4)),
    ("initial-policy", "policy", "logprobs", "logprobs", (3, 4)),
])
def test_torch_and_jax_handlers_agree(models, role, model, endpoint, key, shape):
    from jax_rlhf.serving import JaxRoleHandler
    from torch_rlhf.serving import TorchRoleHandler

    config, paths = models
    rollout = _rollout()
    torch_handler = TorchRoleHandler(role, paths[model], config)
    jax_handler = JaxRoleHandler(role, paths[model], config)
    assert torch_handler.identity["tokenizer_sha256"] == jax_handler.identity["tokenizer_sha256"]
    a = torch_handler.call(endpoint, rollout, {})[key]
    b = jax_handler.call(endpoint, rollout, {})[key]
    assert a.shape == b.shape == shape and a.dtype == b.dtype == np.float32
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "JAX"])
def test_both_handlers_refuse_the_same_bad_requests_in_the_same_words(models, backend):
    """The checks live once in shared.serving.handlers; each backend names itself."""
    from shared.serving.protocol import ProtocolError

    if backend == "torch":
        from torch_rlhf.serving import TorchRoleHandler as Handler
    else:
        from jax_rlhf.serving import JaxRoleHandler as Handler
    config, paths = models
    handler = Handler("reward", paths["reward"], config)
    with pytest.raises(ProtocolError, match=f"logprobs: not served by the {backend} reward "
                                            "handler \\(it serves score, score_text\\)"):
        handler.call("logprobs", _rollout(), {})
    rollout = _rollout()
    with pytest.raises(ProtocolError, match="missing field\\(s\\): sample_mask"):
        handler.call("score", {k: v for k, v in rollout.items() if k != "sample_mask"}, {})
    with pytest.raises(ProtocolError, match="sample_mask: shape"):
        handler.call("score", {**rollout, "sample_mask": rollout["sample_mask"][:, :-1]}, {})
    with pytest.raises(ProtocolError, match="texts: expected a non-empty list of strings"):
        handler.call("score_text", {}, {"texts": [1]})
    with pytest.raises(ValueError, match=f"role: 'judge' is invalid for a {backend} model"):
        Handler("judge", paths["reward"], config)


def test_a_torch_reward_server_answers_what_its_handler_computes(models):
    from shared.serving import RoleClient, ServerThread
    from torch_rlhf.serving import TorchRoleHandler

    config, paths = models
    handler = TorchRoleHandler("reward", paths["reward"], config)
    rollout = _rollout(seed=3)
    with ServerThread(handler, host="127.0.0.1", port=0) as server:
        client = RoleClient("reward", server.url,
                            tokenizer_sha256=handler.identity["tokenizer_sha256"], timeout_s=10)
        remote = client.call("score", expect={"scores": (3,)}, **rollout)["scores"]
    assert remote.tobytes() == handler.call("score", rollout, {})["scores"].tobytes()


def _serve(argv, cwd):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "shared.cli", "serve", *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stop(process):
    import signal

    process.send_signal(signal.SIGINT)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def test_rlhf_serve_reward_on_torch_answers_the_jax_handlers_numbers(models, tmp_path,
                                                                     free_port):
    """A server of one backend, checked against the other backend's handler."""
    from jax_rlhf.serving import JaxRoleHandler
    from shared.serving import RoleClient

    config, paths = models
    port = free_port()
    server = _serve(["reward", "--backend", "torch", "--model", paths["reward"], "--port",
                     str(port), "--config", str(DEMO)], tmp_path)
    try:
        local = JaxRoleHandler("reward", paths["reward"], config)
        client = RoleClient("reward", f"http://127.0.0.1:{port}", timeout_s=90,
                            tokenizer_sha256=local.identity["tokenizer_sha256"])
        assert client.wait_until_ready()["identity"]["backend"] == "torch"
        rollout = _rollout(seed=5)
        remote = client.call("score", expect={"scores": (3,)}, **rollout)["scores"]
        np.testing.assert_allclose(remote, local.call("score", rollout, {})["scores"],
                                   atol=TOLERANCE, rtol=0)
    finally:
        assert _stop(server) == 0, server.stderr.read().decode()[-2000:]


def test_a_served_reward_function_scores_as_the_local_one(tmp_path, free_port):
    from shared.reward_fn import load_reward_function

    port = free_port()
    spec = "shared.data.demo:arithmetic_reward"
    server = _serve(["function", "--function", spec, "--port", str(port)], tmp_path)
    try:
        remote = load_reward_function(f"http://127.0.0.1:{port}")
        remote.client.timeout_s = 60
        prompts, answers = ["12+7=", "3+4=", "1+1="], ["19", "8", "2"]
        scores = remote(prompts, answers)
        np.testing.assert_array_equal(scores, load_reward_function(spec)(prompts, answers))
        assert scores.tolist() == [1.0, 0.0, 1.0]
    finally:
        assert _stop(server) == 0, server.stderr.read().decode()[-2000:]
