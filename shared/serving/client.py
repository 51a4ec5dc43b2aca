"""The PPO actor's client of a served role (docs/serving.md).

Synchronous, standard library only: one request at a time from the training loop. A failed
connection, a 5xx answer or a try that hangs (cut at what is left of ``timeout_s``) is retried
with exponential backoff until ``timeout_s`` has passed since the first try; then
`ServedRoleError` names the role, the URL and what the client last heard. A 4xx answer is the
request's fault and is raised at once. Every answer is checked before it is used: the server's
role and tokenizer fingerprint must be the expected ones and each array must have the rows that
were sent, so a partial, stale or foreign answer is never trained on. A server that restarted
is simply reached again by the next try.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import RunError
from shared.serving.protocol import ProtocolError, decode_array, encode_arrays

__all__ = ["RoleClient", "ServedRoleError"]


class ServedRoleError(RunError):
    """A served role that did not answer usably: names role, URL and the last thing heard."""


class RoleClient:
    """Calls one server: ``client.call("score", input_ids=..., attention_mask=...)``."""

    def __init__(self, role: str, url: str, *, tokenizer_sha256: str | None = None,
                 timeout_s: float = 120.0, request_timeout_s: float = 60.0,
                 backoff_s: float = 0.25, max_backoff_s: float = 8.0):
        self.role, self.url = role, url.rstrip("/")
        self.tokenizer_sha256 = tokenizer_sha256
        self.timeout_s, self.request_timeout_s = timeout_s, request_timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.identity: dict[str, Any] | None = None

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        start, delay, last = time.monotonic(), self.backoff_s, "nothing yet"
        while True:
            try:
                # one try never outlasts what is left of timeout_s: a server that hangs fails
                # the call in about timeout_s, as one that is down does
                left = self.timeout_s - (time.monotonic() - start)
                with urllib.request.urlopen(request, timeout=max(0.1, min(
                        self.request_timeout_s, left))) as reply:
                    return self._checked(json.loads(reply.read().decode("utf-8")), path)
            except urllib.error.HTTPError as err:
                text = err.read().decode("utf-8", "replace")
                try:
                    message = json.loads(text).get("error", text)
                except ValueError:
                    message = text
                if err.code < 500:
                    raise ServedRoleError(f"{self.role} server {self.url}{path} refused the "
                                          f"request (HTTP {err.code}): {message}") from None
                last = f"HTTP {err.code}: {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if time.monotonic() - start + delay > self.timeout_s:
                raise ServedRoleError(
                    f"{self.role} server {self.url}: no usable answer to {method} {path} in "
                    f"{self.timeout_s:g} s (last heard: {last}); is `rlhf serve "
                    f"{self.role}` running there?")
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _checked(self, reply: dict, path: str) -> dict:
        identity = reply.get("identity") or {}
        if identity.get("role") != self.role:
            raise ServedRoleError(f"{self.url}{path} is a {identity.get('role')!r} server, not "
                                  f"the {self.role} server this run expects")
        theirs = identity.get("tokenizer_sha256")
        if self.tokenizer_sha256 and theirs and theirs != self.tokenizer_sha256:
            raise ServedRoleError(
                f"{self.role} server {self.url} uses another tokenizer (vocabulary sha256 "
                f"{theirs[:12]}, this run's {self.tokenizer_sha256[:12]}): its token ids would "
                "mean other text; serve a model with this run's tokenizer, or send text")
        self.identity = identity
        return reply

    # ------------------------------------------------------------ calls

    def health(self) -> dict:
        return self._request("GET", "/health", None)

    def wait_until_ready(self) -> dict:
        """Polls /health (with the retry budget) until the server answers."""
        return self.health()

    def call(self, endpoint: str, *, expect: Mapping[str, tuple] | None = None,
             **fields: Any) -> dict[str, Any]:
        """POST /v1/<endpoint> with ``fields`` (numpy arrays travel as bytes); returns the
        answer's arrays decoded and its other fields. ``expect`` maps an output array to the
        shape it must have."""
        reply = self._request("POST", f"/v1/{endpoint}", encode_arrays(
            {k: np.asarray(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()}))
        out: dict[str, Any] = {}
        for key, value in reply.items():
            if key == "identity":
                continue
            try:
                out[key] = (decode_array(value, field=key)
                            if isinstance(value, dict) and "dtype" in value else value)
            except ProtocolError as err:
                raise ServedRoleError(f"{self.role} server {self.url}: malformed answer to "
                                      f"/v1/{endpoint}: {err}") from None
        for key, shape in (expect or {}).items():
            got = out.get(key)
            if not isinstance(got, np.ndarray) or tuple(got.shape) != tuple(shape):
                raise ServedRoleError(
                    f"{self.role} server {self.url}: /v1/{endpoint} answered {key} of shape "
                    f"{getattr(got, 'shape', None)}, expected {tuple(shape)}; not used")
        return out
