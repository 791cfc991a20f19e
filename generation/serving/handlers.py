"""The routing server's endpoint handlers, one function each. They read the server's parts from
`request.app.state.parts` (`Parts`: the service, its config, the metrics, the admission gate);
`generation.serving.app.make_app` only wires them. Authentication is the `asgi.RequireKey`
middleware in front of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from generation.serving import asgi, protocol
from generation.serving.asgi import RequestError
from generation.serving.metrics import ServerMetrics
from generation.serving.service import RoutingService, ServeConfig

log = logging.getLogger("jaxroute.serve")


class Parts(NamedTuple):
    service: RoutingService
    config: ServeConfig
    metrics: ServerMetrics
    admission: asgi.Admission


def _parts(request: Request) -> Parts:
    return request.app.state.parts


async def chat_completions(request: Request):
    return await _completions(request, chat=True)


async def completions(request: Request):
    return await _completions(request, chat=False)


async def _completions(request: Request, chat: bool):
    parts = _parts(request)
    endpoint = "chat.completions" if chat else "completions"
    t0 = time.perf_counter()
    try:
        req, fut, queue = await _admit(request, parts, chat)
    except RequestError as e:
        parts.metrics.failed(e, endpoint)
        return asgi.error_response(e)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if queue is not None:
        return StreamingResponse(_stream(parts, fut, queue, rid, created, chat, t0, endpoint),
                                 media_type="text/event-stream")
    cfg = parts.config
    try:
        live = await _answer(request, parts, fut, cfg.request_timeout_s)
    except RequestError as e:
        parts.metrics.failed(e, endpoint)
        return asgi.error_response(e)
    if live.status.startswith("error") or live.status == "shutdown":
        e = protocol.upstream_error(live)
        parts.metrics.failed(e, endpoint)
        return asgi.error_response(e)
    body = protocol.completion_body(live, rid, created, chat, cfg.model_name,
                                    parts.service.models)
    _served(parts, live, body["jaxroute"], t0, rid, endpoint)
    return JSONResponse(body)


async def _admit(request: Request, parts: Parts, chat: bool):
    """Read and check the request, then take an admission slot and hand it to the engine: a
    slot is taken only once a whole, valid body is in hand, so slow or bad bodies never hold one
    (decision 90). The slot is released on every path: by the engine when it is done with the
    request (also after a 504, a client that left, or a cancel), here on anything else."""
    cfg = parts.config
    body = await asgi.read_json(request, cfg.max_body_bytes, cfg.read_timeout_s)
    req = protocol.parse_request(body, chat, cfg, parts.service.fixed)
    parts.service.check_prompt(req.question)
    parts.admission.enter()
    handed_over = False
    try:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        fut = parts.service.submit(req.question, req.seed, req.max_tokens, loop,
                                   None if queue is None else queue.put_nowait)
        fut.add_done_callback(lambda _: parts.admission.leave())
        handed_over = True
        return req, fut, queue
    finally:
        if not handed_over:
            parts.admission.leave()


async def _answer(request: Request, parts: Parts, fut, timeout_s: float):
    """The engine's answer to a non-streaming request. A client that leaves first, or an answer
    later than `timeout_s` (504), cancels the request in the engine, which then frees its slot:
    nobody is left to read it (decision 90)."""
    gone = asyncio.ensure_future(asgi.client_gone(request))
    try:
        done, _ = await asyncio.wait({fut, gone}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if fut in done:
        return fut.result()
    parts.service.cancel(fut)
    if gone in done:
        raise RequestError(499, "the client went away", "client_closed_request")
    raise RequestError(504, f"no answer within {timeout_s} s", "timeout")


async def _stream(parts: Parts, fut, queue, rid, created, chat, t0, endpoint):
    """The streamed answer; a client that leaves (the response task is cancelled) or a 504
    cancels the request in the engine."""
    try:
        async for event in _events(parts, fut, queue, rid, created, chat, t0, endpoint):
            yield event
    finally:
        if not fut.done():
            parts.service.cancel(fut)


async def _events(parts: Parts, fut, queue, rid, created, chat, t0, endpoint):
    cfg = parts.config
    first = True

    def step(text):
        nonlocal first
        out = protocol.sse(protocol.chunk_body(rid, created, chat, cfg.model_name, text,
                                               first=first))
        first = False
        return out

    def error_event(e: RequestError) -> str:
        parts.metrics.failed(e, endpoint)
        return protocol.sse(asgi.error_body(e.message, e.kind, e.status))

    deadline = time.perf_counter() + cfg.request_timeout_s
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, fut}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=max(0.0, deadline - time.perf_counter()))
        if getter in done:
            yield step(getter.result()["text"])
            continue
        getter.cancel()
        if not done:
            yield error_event(RequestError(504, f"no answer within {cfg.request_timeout_s} s",
                                           "timeout"))
            return
        while not queue.empty():
            yield step(queue.get_nowait()["text"])
        live = fut.result()
        if live.status.startswith("error") or live.status == "shutdown":
            yield error_event(protocol.upstream_error(live))
            return
        tr = protocol.routing_trace(live, parts.service.models)
        yield protocol.sse(protocol.chunk_body(
            rid, created, chat, cfg.model_name, None, protocol.finish_reason(live),
            extra={"usage": protocol.usage(live), "jaxroute": tr}))
        yield protocol.sse("[DONE]")
        _served(parts, live, tr, t0, rid, endpoint)
        return


def _served(parts: Parts, live, tr: dict, t0: float, rid: str, endpoint: str) -> None:
    lat = time.perf_counter() - t0
    parts.metrics.served(live, tr, lat, endpoint)
    log.info(json.dumps({"request": rid, "endpoint": endpoint, "status": 200,
                         "escalated_at": tr["escalated_at"], "flops": tr["cost"]["flops"],
                         "usd": tr["cost"]["usd"], "latency_s": round(lat, 4),
                         "steps": len(live.pieces)}))


def _guarantee(parts: Parts) -> dict | None:
    """What the served router's κ promises (guarantee kind, α, δ, calibration size; decision
    88); None when a fixed rule is served."""
    router = getattr(parts.service.rule, "router", None)
    return None if router is None else {**router.guarantee, "kappa": router.kappa}


async def models(request: Request):
    parts = _parts(request)
    return JSONResponse({"object": "list", "data": [
        {"id": parts.config.model_name, "object": "model", "created": 0, "owned_by": "jaxroute",
         "upstreams": [m.name for m in parts.service.models],
         "guarantee": _guarantee(parts)}]})


async def health(request: Request):
    parts = _parts(request)
    draining = parts.admission.draining
    body = {"status": "draining" if draining else "ok", "in_flight": parts.admission.in_flight,
            "answers": parts.service.stats["requests"],
            "upstream_requests": parts.service.stats["upstream_requests"], "guarantee": _guarantee(parts)}
    return JSONResponse(body, status_code=503 if draining else 200)


async def metrics(request: Request):
    return Response(_parts(request).metrics.text(), media_type="text/plain; version=0.0.4")
