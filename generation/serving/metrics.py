"""The routing server's Prometheus metrics, in a registry of their own (one server per process
is typical, but tests start several): requests and errors, latency, escalations, steps per
model, FLOPs per request, the estimated saving against the largest model alone, and — read at
scrape time — the router's and the engine's seconds and the requests in flight."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from generation.live import online
from generation.serving.asgi import RequestError
from jaxroute import trace


class ServerMetrics:
    def __init__(self, models: Sequence[trace.ModelInfo], router_seconds: Callable[[], float],
                 engine_seconds: Callable[[], float], in_flight: Callable[[], int],
                 upstream_requests: Callable[[], float] = lambda: 0.0):
        self.models = models
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("jaxroute_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=reg)
        self.errors = Counter("jaxroute_errors", "Errors by kind", ["kind"], registry=reg)
        self.latency = Histogram("jaxroute_request_latency_seconds", "Request latency",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=reg)
        self.escalations = Counter("jaxroute_escalations", "Requests the router escalated",
                                   registry=reg)
        self.routed = Counter("jaxroute_routed", "Requests routed", registry=reg)
        self.steps = Counter("jaxroute_steps", "Generated steps (pieces) by model", ["model"],
                             registry=reg)
        self.cost = Histogram("jaxroute_request_cost_flops", "Generation FLOPs per request",
                              buckets=tuple(10.0 ** e for e in range(6, 17)), registry=reg)
        self.saving = Counter("jaxroute_saving_flops", "Estimated FLOPs saved against the "
                              "largest model alone (cumulative)", registry=reg)
        Gauge("jaxroute_router_seconds", "Seconds in router decisions (cumulative)",
              registry=reg).set_function(router_seconds)
        Gauge("jaxroute_engine_seconds", "Seconds with at least one answer in flight (cumulative)",
              registry=reg).set_function(engine_seconds)
        Gauge("jaxroute_in_flight", "Requests in flight", registry=reg).set_function(in_flight)
        Gauge("jaxroute_upstream_requests", "Requests the engine sent upstream: answer streams "
              "and single steps (cumulative)", registry=reg).set_function(upstream_requests)

    def failed(self, e: RequestError, endpoint: str) -> None:
        self.requests.labels(endpoint, str(e.status)).inc()
        self.errors.labels(e.kind).inc()

    def served(self, live: online.Live, trace_obj: dict, latency_s: float, endpoint: str) -> None:
        """A request answered (`trace_obj`: its routing trace)."""
        self.requests.labels(endpoint, "200").inc()
        self.latency.observe(latency_s)
        self.routed.inc()
        if trace_obj["escalated_at"] is not None:
            self.escalations.inc()
        for p in live.pieces:
            self.steps.labels(self.models[p["model"]].name).inc()
        flops = trace_obj["cost"]["flops"]
        self.cost.observe(flops)
        self.saving.inc(max(0.0, self.large_only_flops(live) - flops))

    def large_only_flops(self, live: online.Live) -> float:
        """FLOPs the largest model alone would have spent: the served solution's tokens at its
        N (an estimate, for the saving metric)."""
        tokens = sum(p["cost"]["output_tokens"] for p in live.pieces if p.get("kept", True))
        return 2.0 * self.models[-1].params * tokens

    def text(self) -> bytes:
        return generate_latest(self.registry)
