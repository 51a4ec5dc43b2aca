"""The served-role wire protocol, server batching and the client's checks (loopback only,
with a numpy stand-in for a model)."""

from __future__ import annotations

import base64
import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shared.serving.client import RoleClient, ServedRoleError
from shared.serving.protocol import ProtocolError, decode_array, encode_array
from shared.serving.server import ServerLimits, ServerThread


class FakeReward:
    """End score = sum of ids * mask (float32), so every row's answer is checkable."""

    def __init__(self, role="reward", sha="abc123"):
        self.identity = {"role": role, "backend": "numpy", "model": "fake",
                         "tokenizer_sha256": sha}
        self.batches: list[int] = []
        self.fail_next = 0

    def call(self, endpoint, arrays, body):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("transient failure")
        if endpoint == "score":
            ids, mask = arrays["input_ids"], arrays["attention_mask"]
            self.batches.append(len(ids))
            return {"scores": (ids * mask).sum(-1).astype(np.float32)}
        if endpoint == "score_text":
            return {"scores": np.array([len(t) for t in body["texts"]], np.float32)}
        raise AssertionError(endpoint)


@pytest.fixture
def served():
    servers = []

    def start(handler=None, limits=None):
        server = ServerThread(handler or FakeReward(),
                              limits=limits or ServerLimits(max_wait_ms=50)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _rows(n, width=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, (n, width)).astype(np.int64),
            (rng.random((n, width)) > 0.2).astype(np.int64))


def test_arrays_travel_bit_for_bit_and_bad_ones_are_refused():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert decode_array(encode_array(x), field="x").tobytes() == x.tobytes()
    good = encode_array(x)
    with pytest.raises(ProtocolError, match="x: dtype 'float16' is invalid"):
        decode_array({**good, "dtype": "float16"}, field="x")
    with pytest.raises(ProtocolError, match="do not hold"):
        decode_array({**good, "shape": [3, 5]}, field="x")
    with pytest.raises(ProtocolError, match="exceed the server's limit of 5"):
        decode_array(good, field="x", max_elements=5)
    with pytest.raises(ProtocolError, match="not base64"):
        decode_array({**good, "data": "@@@"}, field="x")


def test_scores_come_back_per_row_with_identity(served):
    server = served()
    client = RoleClient("reward", server.url, tokenizer_sha256="abc123", timeout_s=5)
    ids, mask = _rows(4)
    out = client.call("score", input_ids=ids, attention_mask=mask, expect={"scores": (4,)})
    np.testing.assert_array_equal(out["scores"], (ids * mask).sum(-1).astype(np.float32))
    assert client.identity["model"] == "fake"
    assert client.health()["stats"]["requests"] == 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served):
    handler = FakeReward()
    server = served(handler, limits=ServerLimits(max_batch_rows=32, max_wait_ms=200))
    client = RoleClient("reward", server.url, timeout_s=10)
    requests = [_rows(2, seed=i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: client.call("score", input_ids=r[0],
                                                       attention_mask=r[1])["scores"], requests))
    for (ids, mask), scores in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(scores, (ids * mask).sum(-1).astype(np.float32))
    assert sum(handler.batches) == 16
    assert len(handler.batches) < 8  # some requests shared a forward
    stats = client.health()["stats"]
    assert stats["rows"] == 16 and stats["mean_batch_rows"] > 2


def test_requests_of_other_widths_are_not_mixed(served):
    handler = FakeReward()
    server = served(handler, limits=ServerLimits(max_batch_rows=32, max_wait_ms=200))
    client = RoleClient("reward", server.url, timeout_s=10)
    requests = [_rows(2, width=3 + i % 2, seed=i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda r: client.call("score", input_ids=r[0],
                                                       attention_mask=r[1])["scores"], requests))
    for (ids, mask), scores in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(scores, (ids * mask).sum(-1).astype(np.float32))


def test_a_server_of_another_role_or_tokenizer_is_refused(served):
    server = served(FakeReward(sha="other-vocab"))
    ids, mask = _rows(1)
    with pytest.raises(ServedRoleError, match="uses another tokenizer"):
        RoleClient("reward", server.url, tokenizer_sha256="abc123",
                   timeout_s=5).call("score", input_ids=ids, attention_mask=mask)
    with pytest.raises(ServedRoleError, match="is a 'reward' server, not the critic"):
        RoleClient("critic", server.url, timeout_s=5).health()


def test_malformed_and_oversized_requests_are_400_naming_the_field(served):
    server = served(limits=ServerLimits(max_batch_rows=4, max_request_bytes=4096))
    client = RoleClient("reward", server.url, timeout_s=5)
    ids, mask = _rows(2)
    with pytest.raises(ServedRoleError, match="HTTP 400.*same number of rows"):
        client.call("score", input_ids=ids, attention_mask=mask[:1])
    with pytest.raises(ServedRoleError, match="HTTP 400.*8 rows exceed max_batch_rows=4"):
        client.call("score", input_ids=np.zeros((8, 2), np.int64),
                    attention_mask=np.ones((8, 2), np.int64))
    with pytest.raises(ServedRoleError, match="HTTP 413"):
        client.call("score", input_ids=np.zeros((4, 400), np.int64),
                    attention_mask=np.ones((4, 400), np.int64))
    with pytest.raises(ServedRoleError, match="HTTP 404.*not an endpoint of a reward server"):
        client.call("values", input_ids=ids)
    raw = urllib.request.Request(f"{server.url}/v1/score", data=b"[1, 2]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(raw, timeout=5)
    assert err.value.code == 400
    assert "must be a JSON object" in json.loads(err.value.read())["error"]
    bad = {"input_ids": {**encode_array(ids), "data": base64.b64encode(b"xx").decode()},
           "attention_mask": encode_array(mask)}
    with pytest.raises(ServedRoleError, match="input_ids: 2 bytes do not hold"):
        client._request("POST", "/v1/score", bad)


def test_a_server_down_times_out_naming_role_url_and_what_was_heard(free_port):
    url = f"http://127.0.0.1:{free_port()}"
    client = RoleClient("initial-policy", url, timeout_s=0.6, backoff_s=0.1)
    with pytest.raises(ServedRoleError) as err:
        client.call("logprobs", input_ids=np.zeros((1, 2), np.int64))
    message = str(err.value)
    assert "initial-policy server" in message and url in message
    assert "last heard: URLError" in message and "rlhf serve initial-policy" in message


def test_transient_server_errors_are_retried_and_a_restarted_server_is_reached_again(served):
    handler = FakeReward()
    server = served(handler)
    client = RoleClient("reward", server.url, timeout_s=20, backoff_s=0.05)
    ids, mask = _rows(3)
    handler.fail_next = 2  # two 500s, then an answer
    out = client.call("score", input_ids=ids, attention_mask=mask)
    np.testing.assert_array_equal(out["scores"], (ids * mask).sum(-1).astype(np.float32))
    server.stop()
    restarted = ServerThread(handler, port=server.port)
    timer = threading.Timer(0.5, restarted.start)  # comes back while the client retries
    timer.start()
    try:
        out = client.call("score", input_ids=ids, attention_mask=mask)
        np.testing.assert_array_equal(out["scores"], (ids * mask).sum(-1).astype(np.float32))
    finally:
        timer.join()
        restarted.stop()


def test_an_answer_of_the_wrong_shape_is_never_used(served):
    server = served()
    client = RoleClient("reward", server.url, timeout_s=5)
    ids, mask = _rows(2)
    with pytest.raises(ServedRoleError, match=r"answered scores of shape \(2,\), expected"):
        client.call("score", input_ids=ids, attention_mask=mask, expect={"scores": (3,)})
