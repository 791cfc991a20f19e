"""Assembling the routing server: `build` (an exported router + upstream specs → backends, rule,
`RoutingService`) and `make_app` (the Starlette application: routes to the handlers, the key
middleware, the error handlers — wiring only), and `drain` for a graceful shutdown."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from generation.backends.costs import model_infos
from generation.live import rules
from generation.registry import make_backend
from generation.serving import asgi, handlers
from generation.serving.metrics import ServerMetrics
from generation.serving.service import RoutingService, ServeConfig
from generation.traces import features
from jaxroute import export
from jaxroute.errors import InputError

RULES = ("router", "large", "small")


def make_app(service: RoutingService) -> Starlette:
    """The Starlette application around `service` (its `config` holds the limits)."""
    config = service.config
    admission = asgi.Admission(config.max_concurrent, config.retry_after_s)
    metrics = ServerMetrics(service.models, lambda: service.engine.decide_seconds,
                            lambda: service.stats["busy_seconds"], lambda: admission.in_flight,
                            lambda: service.stats["upstream_requests"])
    middleware = []
    if config.api_key is not None:
        open_paths = {"/health"} | (set() if config.metrics_need_key else {"/metrics"})
        middleware.append(Middleware(asgi.RequireKey, key=config.api_key,
                                     open_paths=frozenset(open_paths)))
    app = Starlette(routes=[
        Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        Route("/v1/completions", handlers.completions, methods=["POST"]),
        Route("/v1/models", handlers.models, methods=["GET"]),
        Route("/health", handlers.health, methods=["GET"]),
        Route("/metrics", handlers.metrics, methods=["GET"]),
    ], middleware=middleware, exception_handlers=asgi.exception_handlers())
    app.state.parts = handlers.Parts(service, config, metrics, admission)
    app.state.admission = admission
    app.state.service = service
    return app


def drain(app, timeout_s: float = 60.0) -> bool:
    """Graceful shutdown: new requests get 503 from now on; wait (up to `timeout_s`) for those
    in flight to finish. True when none is left."""
    return app.state.admission.drain(timeout_s)


def abort(app) -> None:
    """Stop now (a second SIGTERM): every request in flight is answered 503 at once — never a
    500 from a cancelled handler — and new ones get 503 (decision 90)."""
    app.state.admission.draining = True
    app.state.service.abort()


def build(router_dir: str, upstreams: Sequence[str] | None = None, rule: str = "router",
          config: ServeConfig | None = None, *, upstream_api_key: str | None = None,
          params: Sequence[float] | None = None, templates: Sequence[str] | None = None):
    """(app, service) for an exported router and upstream specs (small → large).

    Without `upstreams` the router's own models are served when they are the built-in tiny
    models. The router must have been trained for exactly these models (by name, in order) and
    for the generation layer's features, or this refuses with both lists. `rule`: "router", or
    one model alone through the same stack ("large", "small": the benchmark's baselines).
    `params`: parameter counts of OpenAI-style upstreams (their FLOPs in the trace);
    `templates`: completions upstreams' prompts (`openai_backend.completion_template`, "" for
    Qwen's)."""
    config = config or ServeConfig()
    if rule not in RULES:
        raise InputError(f"rule must be one of {RULES}, got {rule!r}")
    names = export.load_router(router_dir).meta["model_names"]
    if not upstreams:
        if not all(n.startswith("tinylm-") for n in names):
            raise InputError(f"{router_dir}: the router was trained for {names}; give the "
                             "upstreams for them (small → large)")
        upstreams = [f"tinylm:{n.removeprefix('tinylm-')}" for n in names]
    if params is not None and len(params) != len(upstreams):
        raise InputError(f"{len(params)} parameter counts for {len(upstreams)} upstreams")
    # A server outlives an upstream's outage: each failed request is a 502 (no error-rate
    # stop, which suits batch jobs); a bad key, URL or model stops it at start (`check`).
    if templates is not None and len(templates) != len(upstreams):
        raise InputError(f"{len(templates)} templates for {len(upstreams)} upstreams")
    backends = [make_backend(spec, api_key=upstream_api_key, max_error_rate=1.0,
                             params=None if params is None else params[i],
                             template=templates[i] if templates else None)
                for i, spec in enumerate(upstreams)]
    for b in backends:
        if hasattr(b, "check"):
            b.check()
    k = len(backends)
    router = export.load_router(router_dir, model_names=[b.name for b in backends])
    features.check_known(router.meta["feature_names"], router_dir)
    for b, m in zip(backends, router.meta.get("models") or [{}] * k, strict=True):
        want, got = float(m.get("params") or 0), float(b.params or 0)
        if want and got and abs(got - want) > 0.01 * want:  # a model by name only is not enough
            raise InputError(f"{router_dir}: the router was trained for {m['name']!r} with "
                             f"{want:.4g} parameters; upstream {b.name!r} has {got:.4g}")
    if all(spec.startswith("tinylm:") for spec in upstreams):
        config = dataclasses.replace(config, max_tokens=config.max_tokens or 160,
                                     max_tokens_per_step=config.max_tokens_per_step or 64)
    the_rule = {"router": lambda: rules.RouterRule(router),
                "large": lambda: rules.FixedRule("large only", k - 1),
                "small": lambda: rules.FixedRule("small only", 0)}[rule]()
    service = RoutingService(backends, the_rule, model_infos(backends), config)
    return make_app(service), service
