"""The routing server's wire types: what a request may say (`RoutedRequest`, `parse_request`)
and what every answer looks like (`completion_body`, `chunk_body`, the `jaxroute` routing
trace), in OpenAI's chat/completions shapes. Pure functions of their inputs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from generation.live import online
from generation.serving import asgi
from generation.serving.asgi import RequestError
from jaxroute import accounting, trace

HONOURED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "seed",
            "stream", "stream_options", "user"}


@dataclasses.dataclass(frozen=True)
class RoutedRequest:
    """The fields a routed request uses."""

    question: str
    max_tokens: int | None  # the answer's budget across models; None: the guards only
    seed: int
    stream: bool
    model: str


def parse_request(body: dict, chat: bool, config, fixed: dict[str, Any] | None = None
                  ) -> RoutedRequest:
    """The request, or a `RequestError` (400; 404 for an unknown model) naming what is wrong.
    Every other field is refused (`asgi.check_fields`) unless it has the value in `fixed` —
    sampling settings are the upstreams', not the request's. `config`: a `ServeConfig`."""
    model = body.get("model")
    if model != config.model_name:
        raise RequestError(404 if isinstance(model, str) else 400,
                           f"model {model!r} not found; this server routes "
                           f"{config.model_name!r}", "model_not_found", param="model")
    asgi.check_fields(body, HONOURED, fixed if fixed is not None else {"n": 1})
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
    # A budget for the whole answer across models (decision 90); none asked: the guards only.
    max_tokens = asgi.integer(body, limit, None, 1, config.max_tokens)
    seed = asgi.integer(body, "seed", 0, -(2**31), 2**31 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", param="stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return RoutedRequest(question, max_tokens, seed, stream, model)


def routing_trace(live: online.Live, models: Sequence[trace.ModelInfo]) -> dict[str, Any]:
    """The `jaxroute` extension object of a response: every generated piece, the decisions, the
    first escalation, the cost in FLOPs and US dollars."""
    steps, escalated_at = [], None
    flops = usd = 0.0
    for i, p in enumerate(live.pieces):
        m = models[p["model"]]
        flops += accounting.cost_of(p["cost"], m, "flops") * 1e12
        usd += accounting.cost_of(p["cost"], m, "usd_cents") / 100.0
        if escalated_at is None and not p.get("overrun") and (not p.get("kept", True)
                                                              or p["model"] != 0):
            escalated_at = i
        steps.append({"text": p["text"], "model": m.name, "model_index": p["model"],
                      "tokens": p["cost"]["output_tokens"], "kept": p.get("kept", True),
                      "decision": None if p.get("decision") is None else
                      models[p["decision"]].name,
                      "escalation_probability": p.get("score"),
                      "whole_rest": bool(p.get("whole")),
                      # tokens a stream wrote past a decision before its cancel arrived
                      "overrun": bool(p.get("overrun"))})
    prompt = next((p["cost"]["input_tokens"] for p in live.pieces
                   if p["cost"]["input_tokens"]), 0)
    return {"steps": steps, "escalated_at": escalated_at, "status": live.status,
            "prompt_tokens": prompt,
            "answer_tokens": live.tokens, "cost": {"flops": flops, "usd": usd},
            "models": [m.name for m in models]}


def usage(live: online.Live) -> dict[str, int]:
    prompt = sum(p["cost"]["input_tokens"] for p in live.pieces)
    completion = sum(p["cost"]["output_tokens"] for p in live.pieces)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(live: online.Live) -> str:
    """"length" when a limit cut the answer — the request's max_tokens, a step or solution
    limit, an upstream's own "length" finish (its context) — else "stop"."""
    cut = live.truncated or live.status in ("max_steps", "max_tokens")
    return "length" if cut else "stop"


def upstream_error(live: online.Live) -> RequestError:
    """A problem the engine ended with a failed request: 504 when an upstream timed out,
    else 502; 503 when the server stopped it (a second SIGTERM, `RoutingService.abort`)."""
    if live.status == "shutdown":
        return RequestError(503, "the server is shutting down", "server_shutting_down")
    timeout = "Timeout" in live.status or "timed out" in live.status
    return RequestError(504 if timeout else 502,
                        f"an upstream model failed: {live.status.removeprefix('error: ')}",
                        "upstream_error")


def completion_body(live: online.Live, rid: str, created: int, chat: bool, model_name: str,
                    models: Sequence[trace.ModelInfo]) -> dict[str, Any]:
    """A finished request's chat.completion / text_completion object with its routing trace."""
    text = live.answer()
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": finish_reason(live), "logprobs": None} if chat else
              {"index": 0, "text": text, "finish_reason": finish_reason(live), "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model_name, "choices": [choice], "usage": usage(live),
            "jaxroute": routing_trace(live, models)}


def chunk_body(rid: str, created: int, chat: bool, model_name: str, text: str | None = None,
               finish: str | None = None, first: bool = False,
               extra: dict | None = None) -> dict[str, Any]:
    """One streamed chunk: a step's `text` (the first chat delta also says the role), or the
    last chunk's `finish` reason with `extra` (usage and the routing trace)."""
    if chat:
        delta = {} if text is None else {"content": text}
        if text is not None and first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model_name, "choices": [choice], **(extra or {})}


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
