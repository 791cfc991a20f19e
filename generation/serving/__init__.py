"""The HTTP servers: an OpenAI-compatible stepwise routing server in front of any two model endpoints
(`python -m launch.serve`): `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Every request is one problem of a shared `online.Engine` — the same stepwise loop, features,
continuation scheme and routing rule as `generation.live.online.run_online` and `launch.route`, not a
copy (decision 80). The response is a normal chat/completions response plus a `jaxroute` object
with the routing trace; `stream: true` streams accepted steps as server-sent events. Failures
answer in OpenAI's error shape (`generation.serving.asgi`): 400, 401, 404, 408, 413, 429 (with
`Retry-After`), 502 (an upstream failed), 503 (shutting down), 504 (an upstream too slow).

The parts, one module each: `service` (limits, the shared engine: a task per request),
`protocol` (request and response types), `metrics` (Prometheus), `handlers` (one function per
endpoint), `app` (`build`, `make_app`: wiring only); what both servers share (`asgi`), the
tiny-model server
(`tiny_server`) and a load generator (`loadgen`). May import: every other room of `generation`.
"""

from generation.serving.app import RULES, abort, build, drain, make_app
from generation.serving.protocol import RoutedRequest, parse_request, routing_trace
from generation.serving.service import RoutingService, ServeConfig, problem_id

__all__ = ["RULES", "RoutedRequest", "abort", "RoutingService", "ServeConfig", "build", "drain",
           "make_app", "parse_request", "problem_id", "routing_trace"]
