"""An OpenAI-compatible stepwise routing server in front of any two model endpoints.

`make_app(service, config)` is a Starlette (ASGI) application, served by uvicorn
(`python -m launch.serve`): `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Every request is one problem of a shared `online.Engine` — the same stepwise loop, features,
continuation scheme and routing rule as `generation.online.run_online` and `launch.route`, not a
copy (decision 80). Requests that arrive while others are in flight join the engine's next
round: each round, the steps of every in-flight request that waits for the same model go out
together (one batched call for an in-process backend, concurrent HTTP requests for a remote one),
and the router decides for all of their drafts in one call. The engine runs in one worker
thread; the event loop only parses, queues and answers.

The response is a normal chat/completions response (the assembled solution, `finish_reason`,
`usage` summed over models) plus a `jaxroute` object with the routing trace: every step, which
model wrote it, the router's escalation probability per decision, where it escalated, the cost in
FLOPs and in US dollars. `stream: true` streams accepted steps as server-sent events in OpenAI's
chunk format. Failures answer in OpenAI's error shape (`generation.asgi`): 400 (bad request, or
a field the server would otherwise ignore), 401 (key), 404 (model), 408 (body too slow), 413
(body too large), 429 (too many in flight, with `Retry-After`), 502 (an upstream failed), 503
(shutting down), 504 (an upstream too slow).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from generation import asgi, online
from generation.asgi import RequestError
from generation.datasets import Problem
from jaxroute import trace

log = logging.getLogger("jaxroute.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and identity of the server (flags of `launch.serve`)."""

    model_name: str = "jaxroute-router"  # the id clients send as "model"
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    max_body_bytes: int = 1 << 20
    max_steps: int = 30  # steps per solution
    # Generated tokens per solution (a request may ask for fewer) and per step; None: 4096 and
    # 1024, or 160 and 64 for the tiny models (their context is 320 tokens) — see `build`.
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
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.read_timeout_s <= 0 or self.batch_window_s < 0:
            raise ValueError("request_timeout_s > 0, read_timeout_s > 0 and batch_window_s ≥ 0 "
                             "are required")


def problem_id(question: str) -> str:
    """A served problem's id: from its text, so the same question and seed route as
    `online.run_online` routes a `Problem` of this id (seeds derive from it)."""
    return "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]


# -- the shared engine ----------------------------------------------------------------------------


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
        self._stop = False
        self.stats = {"rounds": 0, "decide_seconds": 0.0, "round_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="routing-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def submit(self, question: str, seed: int, max_tokens: int, loop: asyncio.AbstractEventLoop,
               on_step=None) -> asyncio.Future:
        """Queue a problem; the future resolves (on `loop`) with its `online.Live` when done.
        `on_step(event)` is called on `loop` for every accepted step."""
        fut = loop.create_future()
        with self._lock:
            self._pending.append((question, seed, max_tokens, loop, fut, on_step))
            self._lock.notify_all()
        return fut

    def _loop(self) -> None:
        waiting: dict[int, tuple] = {}  # id(live) → (loop, future)
        while True:
            with self._lock:
                while not self._pending and not self.engine.active() and not self._stop:
                    self._lock.wait()
                if self._stop:
                    break
            if self.config.batch_window_s and self._pending:
                time.sleep(self.config.batch_window_s)  # newcomers of this round, together
            with self._lock:
                pending, self._pending = self._pending, []
            for question, seed, max_tokens, loop, fut, on_step in pending:
                cb = None
                if on_step is not None:
                    def cb(event, loop=loop, on_step=on_step):
                        loop.call_soon_threadsafe(on_step, event)
                live = self.engine.admit(Problem(problem_id(question), question, "", "served"),
                                         seed=seed, max_tokens=max_tokens, on_step=cb)
                waiting[id(live)] = (loop, fut)
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
            for live in finished:
                loop, fut = waiting.pop(id(live))
                loop.call_soon_threadsafe(_resolve, fut, live)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


# -- request parsing --------------------------------------------------------------------------


_HONOURED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "seed",
             "stream", "stream_options", "user"}


def parse_request(body: dict, chat: bool, config: ServeConfig,
                  fixed: dict[str, Any] | None = None) -> dict:
    """The fields a routed request uses, or a `RequestError` (400; 404 for an unknown model)
    naming what is wrong. Every other field is refused (`asgi.check_fields`) unless it has the
    value in `fixed` — sampling settings are the upstreams', not the request's."""
    model = body.get("model")
    if model != config.model_name:
        raise RequestError(404 if isinstance(model, str) else 400,
                           f"model {model!r} not found; this server routes "
                           f"{config.model_name!r}", "model_not_found", param="model")
    asgi.check_fields(body, _HONOURED, fixed if fixed is not None else {"n": 1})
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}",
                               param="messages")
        users = [m.get("content") for m in msgs if m["role"] == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise RequestError(400, "'messages' needs a user message with text content",
                               param="messages")
        question = users[-1]
    else:
        question = body.get("prompt")
        if isinstance(question, list) and len(question) == 1:
            question = question[0]
        if not isinstance(question, str) or not question.strip():
            raise RequestError(400, "'prompt' must be a non-empty string", param="prompt")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = asgi.integer(body, limit, config.max_tokens, 1, config.max_tokens)
    seed = asgi.integer(body, "seed", 0, -(2**31), 2**31 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", param="stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return {"question": question, "max_tokens": max_tokens, "seed": seed, "stream": stream,
            "model": model}


# -- responses --------------------------------------------------------------------------------


def routing_trace(live: online.Live, models: Sequence[trace.ModelInfo]) -> dict[str, Any]:
    """The `jaxroute` extension object of a response: every generated piece, the decisions, the
    first escalation, the cost in FLOPs and US dollars."""
    steps, escalated_at = [], None
    flops = usd = 0.0
    for i, p in enumerate(live.pieces):
        m = models[p["model"]]
        flops += trace.cost_of(p["cost"], m, "flops") * 1e12
        usd += trace.cost_of(p["cost"], m, "usd_cents") / 100.0
        if escalated_at is None and (not p.get("kept", True) or p["model"] != 0):
            escalated_at = i
        steps.append({"text": p["text"], "model": m.name, "kept": p.get("kept", True),
                      "decision": None if p.get("decision") is None else
                      models[p["decision"]].name,
                      "escalation_probability": p.get("score"),
                      "whole_rest": bool(p.get("whole"))})
    return {"steps": steps, "escalated_at": escalated_at, "status": live.status,
            "cost": {"flops": flops, "usd": usd},
            "models": [m.name for m in models]}


def usage(live: online.Live) -> dict[str, int]:
    prompt = sum(p["cost"]["input_tokens"] for p in live.pieces)
    completion = sum(p["cost"]["output_tokens"] for p in live.pieces)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(live: online.Live) -> str:
    return "length" if live.status in ("max_steps", "max_tokens") else "stop"


def upstream_error(live: online.Live) -> RequestError:
    """A problem the engine ended with a failed request: 504 when an upstream timed out,
    else 502."""
    timeout = "Timeout" in live.status or "timed out" in live.status
    return RequestError(504 if timeout else 502,
                        f"an upstream model failed: {live.status.removeprefix('error: ')}",
                        "upstream_error")


def _cost_estimate_large(live: online.Live, models: Sequence[trace.ModelInfo]) -> float:
    """FLOPs the largest model alone would have spent: the served solution's tokens at its N
    (an estimate, for the saving metric)."""
    tokens = sum(p["cost"]["output_tokens"] for p in live.pieces if p.get("kept", True))
    return 2.0 * models[-1].params * tokens


def make_metrics():
    """The Prometheus collectors, in their own registry (one server per process is typical, but
    tests start several)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    return reg, {
        "requests": Counter("jaxroute_requests", "Requests by endpoint and status",
                            ["endpoint", "status"], registry=reg),
        "errors": Counter("jaxroute_errors", "Errors by kind", ["kind"], registry=reg),
        "latency": Histogram("jaxroute_request_latency_seconds", "Request latency",
                             buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                             registry=reg),
        "escalations": Counter("jaxroute_escalations", "Requests the router escalated",
                               registry=reg),
        "routed": Counter("jaxroute_routed", "Requests routed", registry=reg),
        "steps": Counter("jaxroute_steps", "Generated steps (pieces) by model", ["model"],
                         registry=reg),
        "cost": Histogram("jaxroute_request_cost_flops", "Generation FLOPs per request",
                          buckets=tuple(10.0 ** e for e in range(6, 17)), registry=reg),
        "saving": Counter("jaxroute_saving_flops", "Estimated FLOPs saved against the largest "
                          "model alone (cumulative)", registry=reg),
    }


# -- building a server ----------------------------------------------------------------------------

RULES = ("router", "large", "small")


def build(router_dir: str, upstreams: Sequence[str] | None = None, rule: str = "router",
          config: ServeConfig = ServeConfig(), *, upstream_api_key: str | None = None,
          params: Sequence[float] | None = None):
    """(app, service) for an exported router and upstream specs (small → large).

    Without `upstreams` the router's own models are served when they are the built-in tiny
    models. The router must have been trained for exactly these models (by name, in order) and
    for the generation layer's features, or this refuses with both lists. `rule`: "router", or
    one model alone through the same stack ("large", "small": the benchmark's baselines).
    `params`: parameter counts of OpenAI-style upstreams (their FLOPs in the trace)."""
    from generation import costs, features, rules
    from generation.backend import make_backend
    from jaxroute import export

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    names = export.load_router(router_dir).meta["model_names"]
    if not upstreams:
        if not all(n.startswith("tinylm-") for n in names):
            raise ValueError(f"{router_dir}: the router was trained for {names}; give the "
                             "upstreams for them (small → large)")
        upstreams = [f"tinylm:{n.removeprefix('tinylm-')}" for n in names]
    if params is not None and len(params) != len(upstreams):
        raise ValueError(f"{len(params)} parameter counts for {len(upstreams)} upstreams")
    # A server outlives an upstream's outage: each failed request is a 502 (no error-rate
    # stop, which suits batch jobs); a bad key, URL or model stops it at start (`check`).
    backends = [make_backend(spec, api_key=upstream_api_key, max_error_rate=1.0,
                             params=None if params is None else params[i])
                for i, spec in enumerate(upstreams)]
    for b in backends:
        if hasattr(b, "check"):
            b.check()
    router = export.load_router(router_dir, feature_names=features.FEATURE_NAMES,
                                model_names=[b.name for b in backends])
    if all(spec.startswith("tinylm:") for spec in upstreams):
        config = dataclasses.replace(config, max_tokens=config.max_tokens or 160,
                                     max_tokens_per_step=config.max_tokens_per_step or 64)
    prices = [getattr(b, "price", costs.Price(0, 0, 0)) for b in backends]
    models = [trace.ModelInfo(b.name, float(b.params), p.input, p.cached_input, p.output)
              for b, p in zip(backends, prices, strict=True)]
    k = len(backends)
    the_rule = {"router": lambda: rules.RouterRule(router),
                "large": lambda: rules.FixedRule("large only", k - 1),
                "small": lambda: rules.FixedRule("small only", 0)}[rule]()
    service = RoutingService(backends, the_rule, models, config)
    return make_app(service), service


# -- the application ------------------------------------------------------------------------------


def make_app(service: RoutingService):
    """The Starlette application around `service` (its `config` holds the limits)."""
    from prometheus_client import Gauge
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    config = service.config
    registry, m = make_metrics()
    admission = asgi.Admission(config.max_concurrent, config.retry_after_s)
    # Read at scrape time: the router's share of the engine's time, and the load.
    Gauge("jaxroute_router_seconds", "Seconds in router decisions (cumulative)",
          registry=registry).set_function(lambda: service.engine.decide_seconds)
    Gauge("jaxroute_engine_seconds", "Seconds the engine spent in rounds (cumulative)",
          registry=registry).set_function(lambda: service.stats["round_seconds"])
    Gauge("jaxroute_in_flight", "Requests in flight",
          registry=registry).set_function(lambda: admission.in_flight)

    def fail(e: RequestError, endpoint: str) -> JSONResponse:
        m["requests"].labels(endpoint, str(e.status)).inc()
        m["errors"].labels(e.kind).inc()
        return asgi.error_response(e)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        if request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise RequestError(401, "a valid API key is needed (Authorization: Bearer …)",
                               "authentication_error")

    def record(live, t0: float, rid: str, endpoint: str, status: int) -> None:
        lat = time.perf_counter() - t0
        tr = routing_trace(live, service.models)
        m["requests"].labels(endpoint, str(status)).inc()
        m["latency"].observe(lat)
        m["routed"].inc()
        if tr["escalated_at"] is not None:
            m["escalations"].inc()
        for p in live.pieces:
            m["steps"].labels(service.models[p["model"]].name).inc()
        m["cost"].observe(tr["cost"]["flops"])
        m["saving"].inc(max(0.0, _cost_estimate_large(live, service.models)
                            - tr["cost"]["flops"]))
        log.info(json.dumps({"request": rid, "endpoint": endpoint, "status": status,
                             "escalated_at": tr["escalated_at"], "flops": tr["cost"]["flops"],
                             "usd": tr["cost"]["usd"], "latency_s": round(lat, 4),
                             "steps": len(live.pieces)}))

    async def completions(request: Request, chat: bool):
        endpoint = "chat.completions" if chat else "completions"
        t0 = time.perf_counter()
        try:
            authorize(request)
            admission.enter()
        except RequestError as e:
            return fail(e, endpoint)
        try:
            body = await asgi.read_json(request, config.max_body_bytes, config.read_timeout_s)
            req = parse_request(body, chat, config, service.fixed)
        except RequestError as e:
            admission.leave()
            return fail(e, endpoint)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue | None = asyncio.Queue() if req["stream"] else None
        fut = service.submit(req["question"], req["seed"], req["max_tokens"], loop,
                             None if queue is None else queue.put_nowait)
        # In flight until the engine is done with it — also after a 504 or a client that left.
        fut.add_done_callback(lambda _: admission.leave())
        if queue is not None:
            return StreamingResponse(_stream(fut, queue, rid, created, chat, t0, endpoint),
                                     media_type="text/event-stream")
        try:
            live = await asyncio.wait_for(asyncio.shield(fut), config.request_timeout_s)
        except TimeoutError:
            return fail(RequestError(504, f"no answer within {config.request_timeout_s} s",
                                     "timeout"), endpoint)
        if live.status.startswith("error"):
            return fail(upstream_error(live), endpoint)
        text = live.answer()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish_reason(live), "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": finish_reason(live),
                   "logprobs": None})
        record(live, t0, rid, endpoint, 200)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else
                             "text_completion", "created": created, "model": config.model_name,
                             "choices": [choice], "usage": usage(live),
                             "jaxroute": routing_trace(live, service.models)})

    async def _stream(fut, queue, rid, created, chat, t0, endpoint):
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent = {"role": False}

        def chunk(delta_text=None, finish=None, extra=None):
            if chat:
                delta = {} if delta_text is None else {"content": delta_text}
                if delta_text is not None and not sent["role"]:
                    delta["role"] = "assistant"
                    sent["role"] = True
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": config.model_name,
                    "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(body)}\n\n"

        def error_event(e: RequestError) -> str:
            m["errors"].labels(e.kind).inc()
            return f"data: {json.dumps(asgi.error_body(e.message, e.kind, e.status))}\n\n"

        deadline = time.perf_counter() + config.request_timeout_s
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, fut}, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(0.0, deadline - time.perf_counter()))
            if getter in done:
                yield chunk(getter.result()["text"])
                continue
            getter.cancel()
            if not done:
                yield error_event(RequestError(504, f"no answer within "
                                               f"{config.request_timeout_s} s", "timeout"))
                return
            while not queue.empty():
                yield chunk(queue.get_nowait()["text"])
            live = fut.result()
            if live.status.startswith("error"):
                yield error_event(upstream_error(live))
                return
            yield chunk(None, finish_reason(live), {"usage": usage(live), "jaxroute":
                                                    routing_trace(live, service.models)})
            yield "data: [DONE]\n\n"
            record(live, t0, rid, endpoint, 200)
            return

    async def chat_route(request):
        return await completions(request, chat=True)

    async def completions_route(request):
        return await completions(request, chat=False)

    async def models_route(request):
        try:
            authorize(request)
        except RequestError as e:
            return fail(e, "models")
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "jaxroute",
             "upstreams": [m_.name for m_ in service.models]}]})

    async def health(request):
        body = {"status": "draining" if admission.draining else "ok",
                "in_flight": admission.in_flight, "rounds": service.stats["rounds"]}
        return JSONResponse(body, status_code=503 if admission.draining else 200)

    async def metrics(request):
        from prometheus_client import generate_latest

        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", completions_route, methods=["POST"]),
        Route("/v1/models", models_route, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers=asgi.exception_handlers())
    app.state.admission = admission
    app.state.service = service
    return app


def drain(app, timeout_s: float = 60.0) -> bool:
    """Graceful shutdown: new requests get 503 from now on; wait (up to `timeout_s`) for those
    in flight to finish. True when none is left."""
    return app.state.admission.drain(timeout_s)
