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

import logging
import os
import signal
import sys
import threading

from absl import flags

from generation import costs, features, rules, serving
from generation.backend import make_backend
from jaxroute import export, trace
from launch import common

_ROUTER = flags.DEFINE_string("router", None, "Exported router folder.")
_UPSTREAMS = flags.DEFINE_list("upstreams", None, "Backend specs small → large (default: the "
                               "router's built-in tiny models).")
_RULE = flags.DEFINE_enum("rule", "router", ["router", "large", "small"], "Serve the router, or "
                          "one model alone through the same stack (the benchmark's baseline).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address.")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_API_KEY = flags.DEFINE_string("api_key", None, "Key clients must send (default: the "
                               "JAXROUTE_API_KEY environment variable; none: open).")
_UPSTREAM_KEY = flags.DEFINE_string("upstream_api_key", None, "Key for OpenAI-style upstreams "
                                    "(default: OPENAI_API_KEY).")
_NAME = flags.DEFINE_string("model_name", serving.ServeConfig.model_name, "Model id served.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", serving.ServeConfig.max_body_bytes,
                                 "Largest request body.")
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
flags.mark_flags_as_required(["router"])
common.check_flags(port=(lambda v: 0 <= v < 65536, "a port"),
                   max_body_bytes=(common.positive, "≥ 1"), max_steps=(common.positive, "≥ 1"),
                   max_tokens=(common.positive, "≥ 1"),
                   max_tokens_per_step=(common.positive, "≥ 1"),
                   max_concurrent=(common.positive, "≥ 1"),
                   request_timeout=(lambda v: v > 0, "> 0"))


def build(router_dir: str, upstreams: list[str] | None, rule: str = "router",
          config: serving.ServeConfig | None = None, upstream_api_key: str | None = None):
    """(app, service) for a router folder and upstream specs; refuses a mismatch."""
    meta = export.load_router(router_dir).meta
    names = meta["model_names"]
    if not upstreams:
        if not all(n.startswith("tinylm-") for n in names):
            raise ValueError(f"{router_dir}: the router was trained for {names}; give "
                             "--upstreams for them (small → large)")
        upstreams = [f"tinylm:{n.removeprefix('tinylm-')}" for n in names]
    backends = [make_backend(s, api_key=upstream_api_key) for s in upstreams]
    router = export.load_router(router_dir, feature_names=features.FEATURE_NAMES,
                                model_names=[b.name for b in backends])
    tiny = all(s.startswith("tinylm:") for s in upstreams)
    config = config or serving.ServeConfig(max_tokens=160 if tiny else 4096,
                                           max_tokens_per_step=64 if tiny else 1024)
    prices = [getattr(b, "price", costs.Price(0, 0, 0)) for b in backends]
    models = [trace.ModelInfo(b.name, float(b.params), p.input, p.cached_input, p.output)
              for b, p in zip(backends, prices, strict=True)]
    k = len(backends)
    the_rule = {"router": lambda: rules.RouterRule(router),
                "large": lambda: rules.FixedRule("large only", k - 1),
                "small": lambda: rules.FixedRule("small only", 0)}[rule]()
    service = serving.RoutingService(backends, the_rule, models, config)
    return serving.make_app(service, config), service


def main(argv):
    del argv
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = serving.ServeConfig(
        model_name=_NAME.value, api_key=_API_KEY.value or os.environ.get("JAXROUTE_API_KEY"),
        max_body_bytes=_MAX_BODY.value, max_steps=_MAX_STEPS.value,
        max_concurrent=_MAX_CONCURRENT.value, request_timeout_s=_TIMEOUT.value,
        **{k: v for k, v in (("max_tokens", _MAX_TOKENS.value),
                             ("max_tokens_per_step", _MAX_STEP_TOKENS.value)) if v})
    tiny_defaults = not _UPSTREAMS.value and _MAX_TOKENS.value is None
    if tiny_defaults:
        cfg = serving.ServeConfig(**{**cfg.__dict__, "max_tokens": 160,
                                     "max_tokens_per_step": _MAX_STEP_TOKENS.value or 64})
    application, service = build(_ROUTER.value, _UPSTREAMS.value, _RULE.value, cfg,
                                 _UPSTREAM_KEY.value)
    server = uvicorn.Server(uvicorn.Config(application, host=_HOST.value, port=_PORT.value,
                                           log_level="warning", timeout_graceful_shutdown=60))

    def shutdown(signum, frame):  # drain, then stop the server
        def go():
            serving.drain(application, cfg.request_timeout_s)
            server.should_exit = True

        threading.Thread(target=go, daemon=True).start()

    server.install_signal_handlers = lambda: None  # ours drain first
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(f"serving {cfg.model_name!r} ({_RULE.value}: {[m.name for m in service.models]}) at "
          f"http://{_HOST.value}:{_PORT.value}/v1", flush=True)
    server.run()
    service.close()


if __name__ == "__main__":
    common.run(main)
