"""What jaxroute's two OpenAI-compatible HTTP servers share (decision 80): the routing server
(`generation.serving`) and the tiny-model server (`generation.serving.tiny_server`) are Starlette
applications served by uvicorn, and both answer every bad request in OpenAI's error shape.

Here: `RequestError` and `error_body` (the error shape), `read_json(request, …)` (a body capped
in bytes and in seconds, UTF-8, one JSON object), `check_fields` (refuse what a server would
otherwise ignore silently), `integer`, `Admission` (requests in flight → 429 with
`Retry-After`, 503 while draining), `RequireKey` (the API-key middleware),
`exception_handlers()` (404/405 in the error shape, never a traceback), and `BackgroundServer`
(uvicorn in a thread on a pre-bound port: tests, benchmarks, programs that embed a server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from jaxroute.errors import quote

log = logging.getLogger("jaxroute.http")


class RequestError(Exception):
    """A failure answered in OpenAI's error shape with HTTP `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers, self.param = headers or {}, param


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: RequestError):
    return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status,
                        headers=e.headers)


async def read_json(request, max_bytes: int, timeout_s: float) -> dict:
    """The request body as a JSON object: 413 beyond `max_bytes` (by header or as it streams
    in), 408 when it takes longer than `timeout_s` to arrive, 400 when it is not UTF-8, not JSON,
    not an object or holds a value Python cannot read. Servers read it *before* taking an
    admission slot, so a slow body never holds one (decision 90)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_bytes:
        raise RequestError(413, f"the body is larger than {max_bytes} bytes")

    async def receive() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise RequestError(413, f"the body is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(receive(), timeout_s)
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s} s") from None
    except ClientDisconnect:  # nobody reads the answer; no traceback for it either
        raise RequestError(400, "the client went away before its body arrived") from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    except RecursionError:  # "[" × 5000: the parser's recursion, not a server error
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise RequestError(400, f"the body's JSON holds a value this server cannot read "
                           f"({quote(str(e), 80)})") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(body).__name__}")
    if _depth(body) > MAX_JSON_DEPTH:  # later code (repr in messages, comparisons) recurses
        raise RequestError(400, f"the body's JSON is nested more than {MAX_JSON_DEPTH} deep")
    return body


MAX_JSON_DEPTH = 32


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        x, d = todo.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(x, dict):
            todo.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            todo.extend((v, d + 1) for v in x)
    return deepest


def check_fields(body: dict, honoured: set[str], fixed: dict[str, Any]) -> None:
    """Refuse every field the server would otherwise ignore: a field must be `honoured`, or be
    one of `fixed` with its fixed value (or null) — e.g. a temperature the server does not
    sample at."""
    for name, value in body.items():
        if name in honoured or value is None:
            continue
        if name not in fixed:
            raise RequestError(400, f"unsupported field {name!r}", param=name)
        want = fixed[name]
        same = (abs(value - want) <= 1e-6 if isinstance(want, float)
                and isinstance(value, int | float) and not isinstance(value, bool)
                else value == want)
        if not same:
            raise RequestError(400, f"{name!r} must be {want!r} here (got {value!r}): this "
                               "server does not change it per request", param=name)


def integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer field in [lo, hi] (integral floats accepted), or 400 naming it."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (
            float("inf"), float("-inf")) or v % 1:
        raise RequestError(400, f"{name!r} must be an integer, got {v!r}", param=name)
    v = int(v)
    if not lo <= v <= hi:
        raise RequestError(400, f"{name!r} must be in [{lo}, {hi}], got {v}", param=name)
    return v


async def client_gone(request) -> None:
    """Return when the client of `request` (its body already read) has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Admission:
    """Requests in flight: beyond `limit` a request gets 429 with `Retry-After`; once `drain`
    has begun every new one gets 503 and the call waits for those in flight."""

    def __init__(self, limit: int, retry_after_s: int = 1):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self.draining = False
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.draining:
                raise RequestError(503, "the server is shutting down", "server_shutting_down")
            if self.in_flight >= self.limit:
                raise RequestError(429, f"{self.limit} requests are in flight; retry later",
                                   "rate_limit_error", {"Retry-After": str(self.retry_after_s)})
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Refuse new requests; wait up to `timeout_s` for those in flight. True when none is
        left."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.in_flight == 0


class RequireKey:
    """ASGI middleware: every HTTP request but those to `open_paths` needs
    `Authorization: Bearer <key>`, else 401 in OpenAI's error shape — before a handler runs,
    so an unauthenticated request takes no admission slot and reads no body."""

    def __init__(self, app, key: str, open_paths: frozenset[str] = frozenset()):
        self.app, self.key, self.open_paths = app, key, open_paths
        self._want = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization")
        if got is not None and _same(got, self._want):
            return await self.app(scope, receive, send)
        e = RequestError(401, "a valid API key is needed (Authorization: Bearer …)",
                         "authentication_error")
        return await error_response(e)(scope, receive, send)


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def exception_handlers() -> dict:
    """404, 405 and any uncaught exception in OpenAI's error shape (the last logged here, never
    sent to the client as a traceback)."""

    async def not_found(request, exc):
        return JSONResponse(error_body(f"no route {request.url.path}", "invalid_request_error",
                                       404), status_code=404)

    async def not_allowed(request, exc):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}",
                                       "invalid_request_error", 405), status_code=405)

    async def crashed(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                       500), status_code=500)

    return {404: not_found, 405: not_allowed, Exception: crashed}


def guarded_h11(header_timeout_s: float = 10.0, max_connections: int = 1024):
    """uvicorn's h11 protocol with what uvicorn lacks for untrusted clients (decisions 83, 90):
    a connection that has not sent a complete request head within `header_timeout_s` (after it
    opened, or after its last response) is closed; and when a new connection would make more
    than `max_connections` open, the oldest *idle* one (no request in progress) is closed to make
    room — else the one whose request body has been arriving longest (a slow body) — so a new
    client always gets in; only when every connection is busy with a request in hand is the new
    one refused. Bodies have their own limits (`read_json`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None
        _since = 0.0  # when the connection became idle, or when its request began
        _in_request = False

        def connection_made(self, transport):
            super().connection_made(transport)
            self._since = self.loop.time()
            if len(self.connections) > max_connections:
                victim = _victim(self.connections, self)
                if victim is None:
                    log.warning("%d connections open, all busy: refusing another",
                                len(self.connections) - 1)
                    transport.close()
                    return
                victim.transport.close()
            self._arm()

        def _arm(self):
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self):
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request head within the limit

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()
                if not self._in_request:
                    self._in_request, self._since = True, self.loop.time()

        def on_response_complete(self):
            super().on_response_complete()
            self._in_request, self._since = False, self.loop.time()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    def _victim(connections, newcomer):
        """The connection to close for a newcomer: the oldest idle one, else the oldest whose
        request body is still arriving; None when every other one has a request in hand."""
        others = [c for c in connections if c is not newcomer
                  and isinstance(c, GuardedH11Protocol) and not c.transport.is_closing()]
        idle = [c for c in others if not c._in_request]
        slow = [c for c in others if c._in_request and c.conn.their_state is h11.SEND_BODY]
        for group in (idle, slow):
            if group:
                return min(group, key=lambda c: c._since)
        return None

    return GuardedH11Protocol


def uvicorn_config(app, *, header_timeout_s: float = 10.0, max_connections: int = 1024,
                   **kw):
    """A `uvicorn.Config` for `app` on the guarded h11 protocol (`guarded_h11`)."""
    kw.setdefault("log_level", "warning")
    return uvicorn.Config(app, http=guarded_h11(header_timeout_s, max_connections), **kw)


class BackgroundServer:
    """uvicorn serving `app` in a daemon thread on a port bound before it starts (`port=0`: a
    free one), so `base_url` is known at once; `uvicorn_config_kw` go to `uvicorn_config`. A
    context manager; `close()` stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_config_kw):
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, lifespan="off", **uvicorn_config_kw))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
