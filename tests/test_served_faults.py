"""Served roles under faults, through the PPO loop (issue 12): each fault ends in a clear
`ServedRoleError` naming the role, the URL and what the client last heard, or in a recovery
whose run equals an undisturbed one; never in a silently different number. The client-level
checks (retries of a 5xx, a wrong role, a wrong shape) and the server's refusals of malformed
and oversized requests are in tests/shared/test_serving.py."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from served_runs import assert_same_run, config, ppo_lines, role_handler, run_ppo

ROLES = {"reward": ("reward", "ppo.reward_model"),
         "initial-policy": ("policy", "ppo.initial_policy")}


def _handler(role, models, *overrides):
    return role_handler("torch", role, models[ROLES[role][0]], config(*overrides))


class KilledAndRestarted:
    """Wraps a role handler. After answering call ``after`` its server goes away (stopped; the
    answer in flight is still sent), the client's next connection is cut off at the port, and
    then the same model is served again on the same port: a server killed between two calls
    of the run and restarted a moment later, with the run's next call landing in between."""

    def __init__(self, handler, *, after: int):
        self.handler, self.identity, self.after = handler, handler.identity, after
        self.calls, self.server, self.restarted = 0, None, None
        self.cut_off = threading.Event()  # the client did try while the server was down
        self.done = threading.Event()

    def call(self, endpoint, arrays, body):
        out = self.handler.call(endpoint, arrays, body)
        self.calls += 1
        if self.calls == self.after:
            threading.Thread(target=self._kill_and_restart, daemon=True).start()
        return out

    def _kill_and_restart(self):
        from shared.serving import ServerThread

        port = self.server.port
        self.server.stop()
        with socket.socket() as dead:
            dead.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            dead.bind(("127.0.0.1", port))
            dead.listen()
            dead.settimeout(30)
            try:
                connection, _ = dead.accept()
                connection.close()  # no answer: the client sees the connection dropped
                self.cut_off.set()
            except TimeoutError:
                pass
        time.sleep(0.5)  # a moment down: the client's retries meet a closed port
        self.restarted = ServerThread(self, port=port).start()
        self.done.set()


@pytest.mark.parametrize("role", ["reward", "initial-policy"])
def test_a_server_killed_mid_run_and_restarted_gives_the_undisturbed_run(
        served_models, in_process_ppo, tmp_path, role):
    from shared.serving import ServerThread

    flaky = KilledAndRestarted(_handler(role, served_models), after=1)
    flaky.server = ServerThread(flaky).start()
    try:
        run = run_ppo("torch", served_models, tmp_path,
                      [f"{ROLES[role][1]}.url={flaky.server.url}"])
    finally:
        flaky.done.wait(60)
        flaky.server.stop()
        if flaky.restarted is not None:
            flaky.restarted.stop()
    assert flaky.cut_off.is_set() and flaky.calls == 2  # the fault happened, then recovered
    assert_same_run(in_process_ppo("torch"), run)  # the undisturbed run


def test_a_server_down_at_start_fails_naming_role_url_and_what_was_heard(
        served_models, tmp_path, free_port):
    from shared.serving import ServedRoleError

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServedRoleError, match=(
            rf"initial-policy server {re.escape(url)}: no usable answer to GET /health in 1 s "
            r"\(last heard: URLError: \[Errno 111\] Connection refused\); is `rlhf serve "
            r"initial-policy` running there\?")):
        run_ppo("torch", served_models, tmp_path, [f"ppo.initial_policy.url={url}",
                                                   "ppo.initial_policy.timeout_s=1"])
    assert ppo_lines(tmp_path) == []  # no iteration ran


class Slow:
    """A handler that takes ``seconds`` over each answer (a server stuck in a long batch)."""

    def __init__(self, handler, seconds: float):
        self.handler, self.identity, self.seconds = handler, handler.identity, seconds

    def call(self, endpoint, arrays, body):
        time.sleep(self.seconds)
        return self.handler.call(endpoint, arrays, body)


def test_a_server_slower_than_timeout_s_fails_naming_role_url_and_what_was_heard(
        served_models, tmp_path):
    from shared.serving import ServedRoleError, ServerThread

    with ServerThread(Slow(_handler("reward", served_models), seconds=3)) as server, \
            pytest.raises(ServedRoleError, match=(
                rf"reward server {re.escape(server.url)}: no usable answer to POST /v1/score "
                r"in 1 s \(last heard: TimeoutError: timed out\)")):
        run_ppo("torch", served_models, tmp_path, [f"ppo.reward_model.url={server.url}",
                                                   "ppo.reward_model.timeout_s=1"])
    assert ppo_lines(tmp_path) == []


def test_a_server_with_another_tokenizer_is_refused_at_start(served_models, tmp_path):
    """The config names a reward tokenizer of its own; the server has the actor's."""
    from shared.serving import ServedRoleError, ServerThread

    with ServerThread(_handler("reward", served_models)) as server, \
            pytest.raises(ServedRoleError, match=(
                rf"reward server {re.escape(server.url)} uses another tokenizer")):
        run_ppo("torch", served_models, tmp_path, [
            f"ppo.reward_model.url={server.url}", "model.retokenize_for_reward=true",
            f"model.reward_tokenizer_name_or_path={served_models['tokenizer']}"])
    assert ppo_lines(tmp_path) == []
