"""The critic server's step rule and checkpoints (`shared.serving.critic_handler`), over HTTP
on loopback with a numpy stand-in for a backend's critic: a retried ``train_step`` is
answered from the cache and not applied twice, a step out of order is refused (409) naming
both numbers, a restarted server that lost its state says to resume, and save/load restore
the weights and the step counter the actor's checkpoint recorded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from shared.errors import RunError
from shared.serving import ServerThread
from shared.serving.client import ServedRoleError
from shared.serving.critic_client import ServedCritic
from shared.serving.critic_handler import CRITIC_FIELDS, CriticHandler


class FakeCritic:
    """One weight; a step adds the micro-batches' mean return times the normaliser."""

    identity = {"role": "critic", "backend": "numpy", "model": "fake",
                "tokenizer_sha256": None}
    total_steps = 10

    def __init__(self):
        self.weight, self.applied = 0.0, 0

    def values(self, rollout):
        return np.full(rollout["response"].shape, self.weight, np.float32)

    def train(self, micro_batches, normalizers):
        self.applied += 1
        self.weight += sum(float(m["returns"].mean()) * n
                           for m, n in zip(micro_batches, normalizers, strict=True))
        return {"critic_loss": self.weight, "value_clip_fraction": 0.5, "critic_lr": 1e-3,
                "critic_grad_norm": float(self.applied)}

    def save(self, path: Path):
        path.mkdir()
        np.save(path / "weight.npy", np.float64(self.weight))

    def load(self, path: Path):
        self.weight = float(np.load(path / "weight.npy"))

    def export(self, path: Path):
        Path(path).mkdir(parents=True)
        (path / "weight.txt").write_text(repr(self.weight))


class Tokenizer:
    special_tokens_map: dict = {}

    def get_vocab(self):
        return {"a": 0, "b": 1}


def _client(url):
    config = SimpleNamespace(ppo=SimpleNamespace(critic=SimpleNamespace(url=url, timeout_s=5.0)))
    return ServedCritic(config, Tokenizer(), total_steps=FakeCritic.total_steps)


def _micro(value: float, count: int = 2):
    batch = {f: np.zeros((3, 4), np.int64) for f in CRITIC_FIELDS}
    batch.update(returns=np.full((3, 4), value, np.float32),
                 values=np.zeros((3, 4), np.float32),
                 response_mask=np.ones((3, 4), np.float32))
    return [batch] * count, [1.0] * count


@pytest.fixture
def server(tmp_path):
    critic = FakeCritic()
    handler = CriticHandler(critic, checkpoint_dir=tmp_path / "ckpt")
    with ServerThread(handler) as thread:
        yield thread, handler, critic


def test_a_retried_step_is_answered_from_the_cache_not_applied_twice(server):
    thread, handler, critic = server
    client = _client(thread.url)
    first = client.train_step(*_micro(1.0))
    assert first["critic_loss"] == 2.0 and critic.applied == 1
    client.step -= 1  # the answer was lost: the client sends step 0 again
    assert client.train_step(*_micro(1.0)) == first
    assert critic.applied == 1 and critic.weight == 2.0 and handler.step == 1
    assert client.train_step(*_micro(0.5))["critic_loss"] == 3.0 and handler.step == 2


def test_a_step_out_of_order_is_refused_naming_both_numbers(server):
    thread, handler, critic = server
    client = _client(thread.url)
    client.train_step(*_micro(1.0))
    client.step = 5
    with pytest.raises(ServedRoleError, match=r"HTTP 409.*next step is 1, the request is "
                                              r"for step 5"):
        client.train_step(*_micro(1.0))
    assert critic.applied == 1 and handler.step == 1


def test_a_restarted_server_without_state_says_to_resume(server):
    thread, handler, critic = server
    client = _client(thread.url)
    client.step = 3  # the run is at step 3; this server has applied none
    with pytest.raises(ServedRoleError, match=r"next step is 0.*step 3.*lost the run's "
                                              r"critic state; resume the run"):
        client.train_step(*_micro(1.0))
    assert critic.applied == 0


def test_save_and_load_restore_weights_and_step(server, tmp_path):
    thread, handler, critic = server
    client = _client(thread.url)
    client.train_step(*_micro(1.0))
    record = client.save("iter-00000001")
    assert record["step"] == 1 and record["tag"] == "iter-00000001"
    assert (tmp_path / "ckpt" / "iter-00000001" / "critic" / "weight.npy").is_file()
    client.train_step(*_micro(1.0))
    assert critic.weight == 4.0 and handler.step == 2
    client.load(record, checkpoint=Path("iter-00000001"))
    assert critic.weight == 2.0 and handler.step == 1 and client.step == 1
    with pytest.raises(RunError, match="recorded step 7"):
        client.load({**record, "step": 7}, checkpoint=Path("iter-00000001"))
    with pytest.raises(RunError, match="no served critic's checkpoint"):
        client.load(None, checkpoint=Path("iter-00000001"))
    out = client.export(tmp_path / "export")
    assert Path(out, "weight.txt").read_text() == "2.0"


def test_values_and_a_wrong_total_steps(server):
    thread, handler, critic = server
    client = _client(thread.url)
    client.total_steps = 99
    with pytest.raises(ServedRoleError, match="the run has 99 critic steps, this server "
                                              "schedules 10"):
        client.train_step(*_micro(1.0))
    reply = client.client.call("values", expect={"values": (3, 4)},
                               **{f: np.zeros((3, 4), np.int64)
                                  for f in ("prompt_ids", "prompt_mask", "response",
                                            "sample_mask")})
    assert np.all(reply["values"] == 0.0)


def test_async_steps_run_while_the_caller_works_and_reach_the_server_in_order(tmp_path):
    """`train_step_async` returns while the server is still training (the actor's own step
    runs meanwhile); a second step waits for the first, so the server sees 0 then 1."""
    import threading

    release = threading.Event()

    class HeldCritic(FakeCritic):
        def train(self, micro_batches, normalizers):
            assert release.wait(10), "the test never released the step"
            return super().train(micro_batches, normalizers)

    critic = HeldCritic()
    with ServerThread(CriticHandler(critic, checkpoint_dir=tmp_path / "ckpt")) as thread:
        client = _client(thread.url)
        first = client.train_step_async(*_micro(1.0))
        second = client.train_step_async(*_micro(0.5))
        assert not first.done() and critic.applied == 0  # the caller goes on meanwhile
        release.set()
        assert first.result(10)["critic_loss"] == 2.0
        assert second.result(10)["critic_loss"] == 3.0
    assert critic.applied == 2 and client.step == 2


def test_a_rank_a_step_behind_gets_its_answer_from_the_cache(server):
    """Two ranks send the same steps; one is a step ahead: the late repeat of step 0, after
    step 1 was applied, is answered from the cache; a step older than the kept ones is 409."""
    from shared.serving.critic_handler import ANSWERS_KEPT

    thread, handler, critic = server
    ahead, behind = _client(thread.url), _client(thread.url)
    first = ahead.train_step(*_micro(1.0))
    ahead.train_step(*_micro(0.5))
    assert behind.train_step(*_micro(1.0)) == first  # step 0 again, after step 1
    assert critic.applied == 2 and handler.step == 2
    for value in range(ANSWERS_KEPT):
        ahead.train_step(*_micro(float(value)))
    with pytest.raises(ServedRoleError, match=r"HTTP 409.*request is for step 1\b"):
        behind.train_step(*_micro(0.5))  # step 1: no longer kept
