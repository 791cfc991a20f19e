"""The routing server's engine side: its limits (`ServeConfig`) and the one shared
`online.Engine` every request joins (`RoutingService`, decisions 80 and 94).

Every request is a task of the engine on the server's own event loop — no engine thread, no
hop between loops: an upstream model writes the answer as one stream (one streaming HTTP
request to an OpenAI-compatible server; batched step calls, in a worker thread, for an
in-process model), and the router decides for the drafts of every request waiting at that
moment in one call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
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

    def __post_init__(self):
        for name in ("max_body_bytes", "max_steps", "max_tokens", "max_tokens_per_step",
                     "max_concurrent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise InputError("request_timeout_s > 0 and read_timeout_s > 0 are required")


def problem_id(question: str) -> str:
    """A served problem's id: from its text, so the same question and seed route as
    `online.run_online` routes a `Problem` of this id (seeds derive from it)."""
    return "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]


class RoutingService:
    """Admits problems into the shared engine as tasks on the caller's event loop, hands each
    finished one back to its request (and each accepted step to a streaming request as it
    happens), and cancels those nobody waits for any more."""

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
        # requests: answers served; busy_seconds: wall time with at least one answer in flight
        self.stats = {"requests": 0, "upstream_requests": 0, "busy_seconds": 0.0}
        self._tasks: dict[int, tuple[asyncio.Task, asyncio.Future]] = {}  # id(future) → …
        self._busy_since: float | None = None

    def close(self) -> None:
        """Cancel every request still in flight (their tasks end on their own loop)."""
        for task, _ in list(self._tasks.values()):
            loop = task.get_loop()
            _on_loop(loop, task.cancel)

    def check_prompt(self, question: str) -> None:
        """Refuse (400) a prompt an upstream cannot take — `check_prompt` of every backend that
        has one — before it joins the shared engine, where it would fail the batch of every
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
               loop: asyncio.AbstractEventLoop, on_step=None) -> asyncio.Future:
        """Start routing a problem on `loop` (the running loop); the future resolves with its
        `online.Live` when done. `on_step(event)` is called for every accepted step."""
        fut = loop.create_future()
        live = self.engine.admit(Problem(problem_id(question), question, "", "served"),
                                 seed=seed, max_tokens=max_tokens, on_step=on_step)
        if not self._tasks:
            self._busy_since = time.perf_counter()
        task = loop.create_task(self._serve(live, fut))
        self._tasks[id(fut)] = (task, fut)
        return fut

    async def _serve(self, live: online.Live, fut: asyncio.Future) -> None:
        try:
            await self.engine.route(live)
        except asyncio.CancelledError:
            live.status, live.done = "cancelled", True
        except Exception as e:  # an upstream that raises fails this request, not the others
            log.exception("routing a request failed")
            live.status, live.done = f"error: {type(e).__name__}: {e}", True
        finally:
            self.engine.live.remove(live)
            self._tasks.pop(id(fut), None)
            self.stats["requests"] += 1
            self.stats["upstream_requests"] += live.requests
            if not self._tasks and self._busy_since is not None:
                self.stats["busy_seconds"] += time.perf_counter() - self._busy_since
                self._busy_since = None
            _resolve(fut, live if live.status != "cancelled" else _Stopped("cancelled"))

    def cancel(self, fut: asyncio.Future) -> None:
        """Nobody waits for this request any more (its client left, or it timed out): its task
        is cancelled at once — its upstream streams are closed — and it resolves as
        "cancelled", which frees its admission slot (decision 90)."""
        entry = self._tasks.get(id(fut))
        if entry is not None:
            entry[0].cancel()

    def abort(self) -> None:
        """Answer every request in flight at once as "shutdown" (a 503; the second SIGTERM of
        `launch.serve`, from a signal handler or any thread) and cancel their tasks."""
        for task, fut in list(self._tasks.values()):
            _on_loop(task.get_loop(), _resolve, fut, _Stopped("shutdown"))
            _on_loop(task.get_loop(), task.cancel)


@dataclasses.dataclass
class _Stopped:
    """What a request the engine never finished resolves to (its `status` says why)."""

    status: str


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """`fn(*args)` on `loop` — unless that loop has closed: the server is gone and nobody reads
    the answer."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        pass
