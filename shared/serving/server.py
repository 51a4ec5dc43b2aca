"""An aiohttp server for one served role, with request batching (docs/serving.md).

The model work is a backend's `RoleHandler`: synchronous calls, run one at a time on a worker
thread so the event loop keeps accepting requests while a batch computes. Requests to a
batchable endpoint (``score``, ``logprobs``, ``values``) that queued while the previous batch
computed are taken together, and the batch waits up to ``max_wait_ms`` more for others, all
with the same non-row shapes and up to ``max_batch_rows`` rows; the handler sees one
concatenated batch and each request gets back its own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from shared.serving.protocol import (
    ENDPOINTS,
    ConflictError,
    ProtocolError,
    decode_array,
    encode_arrays,
)

__all__ = ["BATCHABLE", "RoleHandler", "ServerLimits", "ServerThread", "make_app", "serve"]

logger = logging.getLogger(__name__)

SERVER_KEY = web.AppKey("server", object)
BATCHABLE = ("score", "logprobs", "values")
"""Endpoints whose requests are rows of one batch: concatenated on the way in, split out."""


class RoleHandler(Protocol):
    """What a backend implements to serve a role."""

    identity: dict[str, Any]
    """role, backend, model (path), tokenizer_sha256: sent with every response."""

    def call(self, endpoint: str, arrays: dict[str, np.ndarray],
             body: Mapping[str, Any]) -> dict[str, Any]:
        """Runs ``endpoint`` on decoded ``arrays`` (and the body's other fields); returns
        arrays (numpy, one row per input row for a batchable endpoint) and JSON values."""


@dataclass(frozen=True)
class ServerLimits:
    """Batching and request bounds (`rlhf serve` flags)."""

    max_batch_rows: int = 64
    max_wait_ms: float = 0.0
    max_request_bytes: int = 64 * 2**20
    max_elements: int = 16 * 2**20


@dataclass
class _Pending:
    arrays: dict[str, np.ndarray]
    body: Mapping[str, Any]
    rows: int
    future: asyncio.Future = field(repr=False)


@dataclass
class _Stats:
    requests: int = 0
    batches: int = 0
    rows: int = 0
    errors: int = 0
    busy_s: float = 0.0
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "rows": self.rows,
                "errors": self.errors, "busy_s": round(self.busy_s, 3),
                "mean_batch_rows": round(self.rows / self.batches, 2) if self.batches else 0.0,
                "uptime_s": round(time.time() - self.started, 3)}


def _signature(arrays: Mapping[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, v.dtype.name, v.shape[1:]) for k, v in arrays.items()))


class _Server:
    def __init__(self, handler: RoleHandler, limits: ServerLimits):
        self.handler, self.limits = handler, limits
        self.role = handler.identity["role"]
        self.stats = _Stats()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-serve")
        self.queues: dict[str, asyncio.Queue] = {}
        self.tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ batching

    async def _run(self, endpoint: str, arrays, body) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            return await loop.run_in_executor(self.worker, self.handler.call, endpoint,
                                              arrays, body)
        finally:
            self.stats.busy_s += time.perf_counter() - start

    async def _batcher(self, endpoint: str, queue: asyncio.Queue) -> None:
        held: _Pending | None = None
        while True:
            first = held or await queue.get()
            held = None
            group, rows = [first], first.rows
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            signature = _signature(first.arrays)
            while rows < self.limits.max_batch_rows:
                # what queued while the last batch computed joins at once; then up to
                # max_wait_ms for more
                timeout = deadline - time.monotonic()
                try:
                    item = (queue.get_nowait() if timeout <= 0 or not queue.empty()
                            else await asyncio.wait_for(queue.get(), timeout))
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if (_signature(item.arrays) != signature
                        or rows + item.rows > self.limits.max_batch_rows):
                    held = item  # the next batch starts with it
                    break
                group.append(item)
                rows += item.rows
            await self._answer(endpoint, group, rows)

    async def _answer(self, endpoint: str, group: list[_Pending], rows: int) -> None:
        arrays = {k: np.concatenate([p.arrays[k] for p in group]) for k in group[0].arrays}
        try:
            out = await self._run(endpoint, arrays, group[0].body)
            self.stats.batches += 1
            self.stats.rows += rows
            start = 0
            for p in group:
                part = {k: (v[start:start + p.rows] if isinstance(v, np.ndarray) else v)
                        for k, v in out.items()}
                start += p.rows
                if not p.future.done():
                    p.future.set_result(part)
        except Exception as err:  # noqa: BLE001 (each waiting request gets the error)
            for p in group:
                if not p.future.done():
                    p.future.set_exception(err)

    # ------------------------------------------------------------ endpoints

    def _identity(self, **extra: Any) -> dict[str, Any]:
        return {"identity": self.handler.identity, **extra}

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(self._identity(status="ready", stats=self.stats.to_json(),
                                                endpoints=list(ENDPOINTS[self.role])))

    async def endpoint(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ENDPOINTS[self.role]:
            return self._error(404, f"POST /v1/{name}: not an endpoint of a {self.role} server; "
                                    f"it has {', '.join(ENDPOINTS[self.role])}")
        self.stats.requests += 1
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ProtocolError("the body must be a JSON object")
            arrays = {k: decode_array(v, field=k, max_elements=self.limits.max_elements)
                      for k, v in body.items() if isinstance(v, dict) and "dtype" in v}
            others = {k: v for k, v in body.items() if k not in arrays}
            if name in BATCHABLE:
                out = await self._enqueue(name, arrays, others)
            else:
                out = await self._run(name, arrays, others)
        except web.HTTPRequestEntityTooLarge:
            self.stats.errors += 1
            return self._error(413, f"POST /v1/{name}: the request is larger than "
                                    f"max_request_bytes={self.limits.max_request_bytes}")
        except ConflictError as err:  # the request does not fit the server's state
            self.stats.errors += 1
            return self._error(409, f"POST /v1/{name}: {err}")
        except (ProtocolError, ValueError) as err:
            self.stats.errors += 1
            return self._error(400, f"POST /v1/{name}: {err}")
        except Exception as err:  # noqa: BLE001 (the client hears what failed)
            self.stats.errors += 1
            logger.exception("POST /v1/%s failed", name)
            return self._error(500, f"POST /v1/{name}: {type(err).__name__}: {err}")
        return web.json_response(self._identity(**encode_arrays(out)))

    async def _enqueue(self, name: str, arrays: dict[str, np.ndarray], body) -> dict:
        if not arrays:
            raise ProtocolError("no arrays in the request")
        rows = {v.shape[0] if v.ndim else -1 for v in arrays.values()}
        if len(rows) != 1 or -1 in rows:
            raise ProtocolError("every array must have the same number of rows")
        (count,) = rows
        if count > self.limits.max_batch_rows:
            raise ProtocolError(f"{count} rows exceed max_batch_rows={self.limits.max_batch_rows}")
        if name not in self.queues:
            self.queues[name] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._batcher(name, self.queues[name])))
        future = asyncio.get_running_loop().create_future()
        await self.queues[name].put(_Pending(arrays, body, count, future))
        return await future

    def _error(self, status: int, message: str) -> web.Response:
        return web.json_response(self._identity(error=message), status=status)

    async def close(self, app: web.Application) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.worker.shutdown(wait=True)


def make_app(handler: RoleHandler, limits: ServerLimits | None = None) -> web.Application:
    """The aiohttp application serving ``handler``: GET /health, POST /v1/<endpoint>."""
    limits = limits or ServerLimits()
    server = _Server(handler, limits)
    app = web.Application(client_max_size=limits.max_request_bytes)
    app.router.add_get("/health", server.health)
    app.router.add_post("/v1/{name}", server.endpoint)
    app.on_cleanup.append(server.close)
    app[SERVER_KEY] = server
    return app


def serve(handler: RoleHandler, *, host: str, port: int,
          limits: ServerLimits | None = None) -> None:
    """Serves until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    identity = handler.identity
    logger.info("serving %s (%s backend, model %s) on http://%s:%d", identity["role"],
                identity.get("backend"), identity.get("model"), host, port)
    web.run_app(make_app(handler, limits), host=host, port=port, print=None,
                handle_signals=True)


class ServerThread:
    """``make_app(handler)`` served on a thread of this process (tests, notebooks, a role
    beside the trainer): ``with ServerThread(handler, port=0) as server: server.url``.
    ``port=0`` takes a free port."""

    def __init__(self, handler: RoleHandler, *, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits | None = None):
        self.handler, self.host, self.port, self.limits = handler, host, port, limits
        self.loop = asyncio.new_event_loop()
        self.thread: threading.Thread | None = None
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        ready, failure = threading.Event(), []

        async def boot():
            self.runner = web.AppRunner(make_app(self.handler, self.limits))
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 (port 0)

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(boot())
            except Exception as err:  # noqa: BLE001 (re-raised in start)
                failure.append(err)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="rlhf-serve-loop", daemon=True)
        self.thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"could not serve on {self.host}:{self.port}: "
                               f"{failure[0] if failure else 'timed out'}")
        return self

    def stop(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            return
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
