"""Serve an exported router over the OpenAI API, in front of two (or more) model endpoints.

    python -m launch.serve --router=runs/experiment/router                 # the tiny models
    python -m launch.serve --router=runs/gsm8k/router --port=8000 \\
        --upstreams=openai-completions:Qwen2.5-Math-1.5B-Instruct@http://gpu:8001/v1,\\
openai-completions:Qwen2.5-Math-7B-Instruct@http://gpu:8002/v1

    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "jaxroute-router", "messages": [{"role": "user", "content": "…"}]}'

Upstreams (small → large): `openai:MODEL@URL`, `openai-completions:MODEL@URL`,
`openai-completions-raw:MODEL@URL`, `vllm:PATH` (in process), `tinylm:small|large`. Without
--upstreams the router's own models are used when they are the built-in tiny models. The router
folder must match the upstreams' models and the generation layer's features, or the server
refuses to start. SIGTERM/SIGINT drain: in-flight requests finish, new ones get 503.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import uvicorn
from absl import flags

from generation import serving
from generation.backends.openai_backend import completion_template
from generation.serving import asgi
from launch import common

_ROUTER = flags.DEFINE_string("router", None, "Exported router folder.")
_UPSTREAMS = flags.DEFINE_list("upstreams", None, "Backend specs small → large (default: the "
                               "router's built-in tiny models).")
_RULE = flags.DEFINE_enum("rule", "router", list(serving.RULES), "Serve the router, or "
                          "one model alone through the same stack (the benchmark's baseline).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address.")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_API_KEY = flags.DEFINE_string("api_key", None, "Key clients must send (default: the "
                               "JAXROUTE_API_KEY environment variable; none: open).")
_METRICS_OPEN = flags.DEFINE_bool("metrics_open", False, "With a key: serve /metrics without "
                                  "it (a scraper inside your network; /health is always open).")
_UPSTREAM_KEY = flags.DEFINE_string("upstream_api_key", None, "Key for OpenAI-style upstreams "
                                    "(default: OPENAI_API_KEY).")
_PARAMS = flags.DEFINE_list("params", None, "Parameter counts of OpenAI-style upstreams, small → "
                            "large (their FLOPs in the routing trace).")
_TEMPLATES = flags.DEFINE_list("upstream_templates", None, "Per completions upstream: a "
                                "tokenizer folder (or hub name) whose chat template renders its "
                                "prompts ('' for Qwen's, the default), e.g. runs/models/small.")
_NAME = flags.DEFINE_string("model_name", serving.ServeConfig.model_name, "Model id served.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", serving.ServeConfig.max_body_bytes,
                                 "Largest request body.")
_READ_TIMEOUT = flags.DEFINE_float("read_timeout", serving.ServeConfig.read_timeout_s,
                                   "Seconds a request body may take to arrive (beyond: 408).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", serving.ServeConfig.max_steps,
                                  "Steps per solution.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Generated tokens per solution "
                                   "(default 4096; 160 for the tiny models).")
_MAX_STEP_TOKENS = flags.DEFINE_integer("max_tokens_per_step", None, "Tokens per step "
                                        "(default 1024; 64 for the tiny models).")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent", serving.ServeConfig.max_concurrent,
                                       "Requests in flight (beyond: 429).")
_TIMEOUT = flags.DEFINE_float("request_timeout", serving.ServeConfig.request_timeout_s,
                              "Seconds before an unanswered request gets 504.")
_HEADER_TIMEOUT = flags.DEFINE_float("header_timeout", 10.0, "Seconds a connection may take to "
                                     "send a request head (beyond: closed).")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", 1024, "Open connections (beyond: a "
                                        "new one is closed at once).")
flags.mark_flags_as_required(["router"])
common.check_flags(port=(lambda v: 0 <= v < 65536, "a port"),
                   max_body_bytes=(common.positive, "≥ 1"), max_steps=(common.positive, "≥ 1"),
                   max_tokens=(common.positive, "≥ 1"),
                   max_tokens_per_step=(common.positive, "≥ 1"),
                   max_concurrent=(common.positive, "≥ 1"),
                   request_timeout=(lambda v: v > 0, "> 0"),
                   read_timeout=(lambda v: v > 0, "> 0"),
                   header_timeout=(lambda v: v > 0, "> 0"),
                   max_connections=(common.positive, "≥ 1"))


def main(argv):
    del argv

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = serving.ServeConfig(
        model_name=_NAME.value, api_key=_API_KEY.value or os.environ.get("JAXROUTE_API_KEY"),
        metrics_need_key=not _METRICS_OPEN.value,
        max_body_bytes=_MAX_BODY.value, max_steps=_MAX_STEPS.value,
        max_tokens=_MAX_TOKENS.value, max_tokens_per_step=_MAX_STEP_TOKENS.value,
        max_concurrent=_MAX_CONCURRENT.value, request_timeout_s=_TIMEOUT.value,
        read_timeout_s=_READ_TIMEOUT.value)
    params = None if _PARAMS.value is None else [float(p) for p in _PARAMS.value]
    application, service = serving.build(_ROUTER.value, _UPSTREAMS.value, _RULE.value, cfg,
                                         upstream_api_key=_UPSTREAM_KEY.value, params=params,
                                         templates=None if _TEMPLATES.value is None else [
                                             completion_template(t) if t else ""
                                             for t in _TEMPLATES.value])
    cfg = service.config
    server = uvicorn.Server(asgi.uvicorn_config(
        application, header_timeout_s=_HEADER_TIMEOUT.value,
        max_connections=_MAX_CONNECTIONS.value, host=_HOST.value, port=_PORT.value,
        timeout_graceful_shutdown=60))

    def shutdown(signum, frame):  # drain, then stop; a second signal: answer everyone 503 now
        if application.state.admission.draining:
            serving.abort(application)
            server.should_exit = True
            return
        print("draining: in-flight requests finish, new ones get 503 (again to stop now)",
              file=sys.stderr, flush=True)

        def go():
            serving.drain(application, cfg.request_timeout_s)
            server.should_exit = True

        threading.Thread(target=go, daemon=True).start()

    server.capture_signals = contextlib.nullcontext  # uvicorn's own handlers would not drain
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(f"serving {cfg.model_name!r} ({_RULE.value}: {[m.name for m in service.models]}) at "
          f"http://{_HOST.value}:{_PORT.value}/v1", flush=True)
    server.run()
    service.close()


if __name__ == "__main__":
    common.run(main)
