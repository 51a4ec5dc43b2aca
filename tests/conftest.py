"""Fixtures every test tree shares (a fixture, not a helper module, so a test under any
folder reaches it however pytest was started)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a port for a server a test starts (`rlhf serve`, `rlhf launch`)."""
    return _free_port
