"""The routing server's engine side: its limits (`ServeConfig`) and the one shared
`online.Engine` every request joins (`RoutingService`, decision 80).

The engine runs in one worker thread; each round, the steps of every in-flight request that
waits for the same model go out together (one batched call for an in-process backend,
concurrent HTTP requests for a remote one) and the router decides for all of their drafts in
one call. The event loop only parses, queues and answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from generation.live import online
from generation.serving.asgi import RequestError
from generation.traces.datasets import Problem
from jaxroute import trace
from jaxroute.errors import InputError

log = logging.getLogger("jaxroute.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and identity of the server (flags of `launch.serve`)."""

    model_name: str = "jaxroute-router"  # the id clients send as "model"
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    metrics_need_key: bool = True  # with api_key: /metrics needs it too (decision 83)
    max_body_bytes: int = 1 << 20
    max_steps: int = 30  # steps per solution
    # Generated tokens per solution (a request may ask for fewer) and per step; None: 4096 and
    # 1024, or 160 and 64 for the tiny models (their context is 192 tokens) — see `build`.
    max_tokens: int | None = None
    max_tokens_per_step: int | None = None
    max_concurrent: int = 256  # requests in flight; beyond → 429
    retry_after_s: int = 1
    request_timeout_s: float = 300.0  # an answer later than this is a 504
    read_timeout_s: float = 30.0  # a body slower than this to arrive is a 408
    batch_window_s: float = 0.002  # the engine waits this long to gather a round's newcomers

    def __post_init__(self):
        for name in ("max_body_bytes", "max_steps", "max_tokens", "max_tokens_per_step",
                     "max_concurrent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.read_timeout_s <= 0 or self.batch_window_s < 0:
            raise InputError("request_timeout_s > 0, read_timeout_s > 0 and batch_window_s ≥ 0 "
                             "are required")


def problem_id(question: str) -> str:
    """A served problem's id: from its text, so the same question and seed route as
    `online.run_online` routes a `Problem` of this id (seeds derive from it)."""
    return "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]


class RoutingService:
    """The engine thread: admits problems, runs rounds while any is live, hands finished ones
    back to their requests (and each accepted step to a streaming request as it happens)."""

    def __init__(self, backends: Sequence, rule, models: Sequence[trace.ModelInfo],
                 config: ServeConfig = ServeConfig()):
        if config.max_tokens is None or config.max_tokens_per_step is None:
            config = dataclasses.replace(config, max_tokens=config.max_tokens or 4096,
                                         max_tokens_per_step=config.max_tokens_per_step or 1024)
        self.backends, self.rule, self.models, self.config = list(backends), rule, models, config
        temps = {getattr(b, "temperature", None) for b in self.backends}
        # Fields a client may send only with the value the upstreams already use.
        self.fixed: dict[str, Any] = {"n": 1, "top_p": 1.0}
        if len(temps) == 1 and None not in temps:
            self.fixed["temperature"] = float(temps.pop())
        self.engine = online.Engine(self.backends, rule, online.OnlineConfig(
            max_steps=config.max_steps, max_tokens_per_step=config.max_tokens_per_step,
            max_tokens_per_solution=config.max_tokens))
        self._lock = threading.Condition()
        self._pending: list[tuple] = []
        self._cancelled: set[int] = set()  # id(future) of requests nobody waits for any more
        self._stop = False
        self.stats = {"rounds": 0, "decide_seconds": 0.0, "round_seconds": 0.0}
        self._futures: dict[int, tuple] = {}  # id(live) → (loop, future), requests in flight
        self._thread = threading.Thread(target=self._loop, name="routing-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def check_prompt(self, question: str) -> None:
        """Refuse (400) a prompt an upstream cannot take — `check_prompt` of every backend that
        has one — before it joins the shared engine, where it would fail the round of every
        other request (decision 83)."""
        for b in self.backends:
            check = getattr(b, "check_prompt", None)
            if check is None:
                continue
            try:
                check(question)
            except ValueError as e:
                raise RequestError(400, f"the prompt cannot be served by {b.name}: {e}",
                                   param="messages") from None

    def submit(self, question: str, seed: int, max_tokens: int | None,
               loop: asyncio.AbstractEventLoop,
               on_step=None) -> asyncio.Future:
        """Queue a problem; the future resolves (on `loop`) with its `online.Live` when done.
        `on_step(event)` is called on `loop` for every accepted step."""
        fut = loop.create_future()
        with self._lock:
            self._pending.append((question, seed, max_tokens, loop, fut, on_step))
            self._lock.notify_all()
        return fut

    def cancel(self, fut: asyncio.Future) -> None:
        """Nobody waits for this request any more (its client left, or it timed out): the engine
        drops it before its next round and resolves it as "cancelled", which frees its admission
        slot (decision 90)."""
        with self._lock:
            self._cancelled.add(id(fut))
            self._lock.notify_all()

    def abort(self) -> None:
        """Answer every request in flight at once as "shutdown" (a 503; the second SIGTERM of
        `launch.serve`) and drop them from the engine before its next round."""
        with self._lock:
            waiting = list(self._futures.values()) + [(p[3], p[4]) for p in self._pending]
            for loop, fut in waiting:
                self._cancelled.add(id(fut))
                _post(loop, fut, _Stopped("shutdown"))
            self._lock.notify_all()

    def _loop(self) -> None:
        waiting = self._futures  # id(live) → (loop, future)
        while True:
            with self._lock:
                while not self._pending and not self.engine.active() and not self._stop \
                        and not self._cancelled:
                    self._lock.wait()
                if self._stop:
                    break
            if self.config.batch_window_s and self._pending:
                time.sleep(self.config.batch_window_s)  # newcomers of this round, together
            with self._lock:
                pending, self._pending = self._pending, []
                cancelled, self._cancelled = self._cancelled, set()
            for question, seed, max_tokens, loop, fut, on_step in pending:
                if id(fut) in cancelled:
                    _post(loop, fut, _Stopped("cancelled"))
                    continue
                cb = None
                if on_step is not None:
                    def cb(event, loop=loop, on_step=on_step):
                        _call(loop, on_step, event)
                live = self.engine.admit(Problem(problem_id(question), question, "", "served"),
                                         seed=seed, max_tokens=max_tokens, on_step=cb)
                waiting[id(live)] = (loop, fut)
            for live in self.engine.active():
                if id(waiting[id(live)][1]) in cancelled:
                    live.status, live.done = "cancelled", True
            if not self.engine.active():
                self._finish(self.engine.collect())
                continue
            t0 = time.perf_counter()
            try:
                finished = self.engine.round()
            except Exception as e:  # an upstream that raises: every request of the round fails
                log.exception("engine round failed")
                for live in self.engine.active():
                    live.status, live.done = f"error: {type(e).__name__}: {e}", True
                finished = self.engine.collect()
            self.stats["rounds"] += 1
            self.stats["round_seconds"] += time.perf_counter() - t0
            self.stats["decide_seconds"] = self.engine.decide_seconds
            self._finish(finished)

    def _finish(self, finished) -> None:
        for live in finished:
            loop, fut = self._futures.pop(id(live))
            _post(loop, fut, live)


@dataclasses.dataclass
class _Stopped:
    """What a request the engine never finished resolves to (its `status` says why)."""

    status: str


def _post(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value) -> None:
    """Resolve `fut` with `value` on its loop."""
    _call(loop, _resolve, fut, value)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """`fn(*args)` on `loop` — unless that loop has closed: the server is gone and nobody reads
    the answer (the engine thread must not die of it)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        pass


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
