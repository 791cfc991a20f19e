"""The routing server on loopback, with the OpenAI SDK as the client: answers and routing traces
equal `generation.live.online`'s, streaming, auth, every error in OpenAI's shape, draining, metrics,
a bounded load test, tiny-model upstreams over HTTP (decision 80), and clients that must not hurt
the others (decision 90). An exception in the engine thread fails the test that caused it."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import socket
import threading
import time
import urllib.parse

import jax
import numpy as np
import openai
import pytest

from generation import serving
from generation.backends.costs import model_infos
from generation.backends.openai_backend import OpenAIBackend
from generation.live import online, rules
from generation.serving import asgi
from generation.serving.tiny_server import TinyLMServer
from generation.tinylm import backend as tiny
from generation.tinylm import task
from generation.traces import features
from generation.traces.answers import AnswerChecker
from generation.traces.datasets import Problem
from jaxroute import accounting, export, guarantee
from jaxroute import networks as nets_lib

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

NAMES = ["tinylm-small", "tinylm-large"]
CFG = serving.ServeConfig(max_tokens=160, max_tokens_per_step=64, max_steps=30)
QUESTIONS = [p.problem.question for p in task.generate(12, seed=7)]


@pytest.fixture(scope="module")
def backends():
    return [tiny.load("small"), tiny.load("large")]


class _Recorder:
    """A rule that never escalates and keeps every draft's features (to place κ)."""

    name, sticky, start_model = "record", True, 0

    def __init__(self):
        self.features = []

    def decide(self, views):
        self.features += [v.features for v in views]
        return [rules.Decision(v.model) for v in views]


def make_router(path, backends, names=features.FEATURE_NAMES):
    """A router over `names` (random weights, normaliser fitted to real drafts) whose κ is the
    85th percentile of those drafts' escalation probabilities, so served problems both stay
    and escalate (a solution has several decisions)."""
    rec = _Recorder()
    engine = online.Engine(backends, rec, online.OnlineConfig(30, 64, 160,
                                                              feature_names=tuple(names)))
    for i, q in enumerate(QUESTIONS[:8]):
        engine.admit(Problem(f"p{i}", q, "", "served"))
    engine.run()
    f = np.stack(rec.features).astype(np.float32)
    nets = nets_lib.make_networks(2, f.shape[1], (8,))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(3))
    params = jax.tree.map(lambda x: 6.0 * x, params)  # decisive probabilities
    norm = nets_lib.Normalizer(f.mean(0), np.maximum(f.std(0), 1e-3))
    export.export_router(path, nets, params, norm, 0.5, feature_names=names,
                         model_names=NAMES, alpha=0.1, hidden=(8,))
    esc = export.load_router(path).decide(f, np.zeros(len(f), np.int32)).escalation_prob
    return export.export_router(path, nets, params, norm, float(np.quantile(esc, 0.85)),
                                feature_names=names, model_names=NAMES, alpha=0.1,
                                hidden=(8,))


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, backends):
    return make_router(tmp_path_factory.mktemp("router") / "router", backends)


def models_of(backends):
    return list(model_infos(backends))


@pytest.fixture(scope="module")
def served(router_dir, backends):
    """The router served in process (tiny upstreams in process), with a key."""
    router = export.load_router(router_dir, features.FEATURE_NAMES, NAMES)
    cfg = serving.ServeConfig(**{**CFG.__dict__, "api_key": "sk-test"})
    service = serving.RoutingService(backends, rules.RouterRule(router), models_of(backends), cfg)
    with asgi.BackgroundServer(serving.make_app(service)) as srv:
        yield srv, service
    service.close()


def client(srv, key="sk-test"):
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def call(method, url, body: bytes | None = None, headers=None):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, u.path, body=body, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def online_records(backends, router_dir, questions, seed):
    """What `generation.live.online` routes for these questions (as `launch.route` would)."""
    router = export.load_router(router_dir, model_names=NAMES)
    problems = [Problem(serving.problem_id(q), q, "", "served") for q in questions]
    checker = AnswerChecker(workers=1)
    try:
        return online.run_online(problems, backends, rules.RouterRule(router), checker,
                                 online.OnlineConfig(CFG.max_steps, CFG.max_tokens_per_step,
                                                     CFG.max_tokens, seed=seed))
    finally:
        checker.close()


def assert_same_route(resp_trace: dict, record: dict, models):
    """The same pieces, decisions and texts — what an upstream stream wrote past a decision
    before its cancel arrived (an "overrun" piece: cost only, its size a matter of timing) is
    left out on both sides."""
    steps = [s for s in resp_trace["steps"] if not s["overrun"]]
    pieces = [p for p in record["pieces"] if not p.get("overrun")]
    assert len(steps) == len(pieces)
    for s, p in zip(steps, pieces, strict=True):
        assert s["text"] == p["text"] and s["model"] == models[p["model"]].name
        assert s["kept"] == p.get("kept", True)
        assert s["decision"] == (None if p.get("decision") is None else
                                 models[p["decision"]].name)
        if p.get("score") is None:
            assert s["escalation_probability"] is None
        else:
            # Texts, models and decisions are defined equal and compared exactly. The probability
            # is float32 arithmetic on features from logits computed in other batch shapes (so
            # other reduction orders: ~1e-6 relative per logit, from one CPU to the next), passed
            # through the router's MLP, which can amplify them up to ~100×: 1e-4 absolute.
            assert s["escalation_probability"] == pytest.approx(p["score"], abs=1e-4)


def test_sdk_answers_equal_online_routing(served, backends, router_dir):
    """Concurrent SDK calls (chat and completions) get exactly what `run_online` gives for the
    same questions and seed — batching with other requests changes nothing."""
    srv, service = served
    qs = QUESTIONS[:6]
    c = client(srv)

    def ask(i):
        if i % 2:
            r = c.completions.create(model=CFG.model_name, prompt=qs[i], seed=11)
            return r.choices[0].text, r.choices[0].finish_reason, r.model_extra["jaxroute"]
        r = c.chat.completions.create(model=CFG.model_name, seed=11,
                                      messages=[{"role": "user", "content": qs[i]}])
        assert r.usage.completion_tokens > 0
        return r.choices[0].message.content, r.choices[0].finish_reason, r.model_extra["jaxroute"]

    with cf.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, range(len(qs))))
    want = online_records(backends, router_dir, qs, seed=11)
    escalated = 0
    for (text, finish, tr), rec in zip(got, want, strict=True):
        assert_same_route(tr, rec, service.models)
        assert text == "\n\n".join(p["text"] for p in rec["pieces"] if p.get("kept", True))
        assert tr["status"] == rec["status"]
        assert finish == ("length" if rec["status"] in ("max_steps", "max_tokens") else "stop")
        escalated += tr["escalated_at"] is not None
        flops = sum(accounting.cost_of(p["cost"], service.models[p["model"]], "flops")
                    for p in rec["pieces"]) * 1e12
        assert tr["cost"]["flops"] == pytest.approx(flops)
    assert 0 < escalated < len(qs)  # both outcomes are exercised


def test_streaming_sends_the_same_solution_step_by_step(served):
    srv, _ = served
    c = client(srv)
    msgs = [{"role": "user", "content": QUESTIONS[2]}]
    whole = c.chat.completions.create(model=CFG.model_name, messages=msgs, seed=3)
    chunks = list(c.chat.completions.create(model=CFG.model_name, messages=msgs, seed=3,
                                            stream=True))
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) == sum(s["kept"] for s in whole.model_extra["jaxroute"]["steps"]) or \
        whole.model_extra["jaxroute"]["steps"][-1]["whole_rest"]
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.model_extra["jaxroute"]["steps"] == whole.model_extra["jaxroute"]["steps"]
    assert chunks[0].choices[0].delta.role == "assistant"


def test_auth(served):
    srv, _ = served
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").chat.completions.create(
            model=CFG.model_name, messages=[{"role": "user", "content": "1 + 1?"}])
    status, _, body = call("GET", srv.base_url + "/models")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    ids = [m.id for m in client(srv).models.list()]
    assert ids == [CFG.model_name]
    root = srv.base_url.removesuffix("/v1")
    # /metrics needs the key too (decision 83); /health stays open for load balancers.
    assert call("GET", root + "/metrics")[0] == 401
    assert call("GET", root + "/metrics", headers=AUTH)[0] == 200
    assert call("GET", root + "/health")[0] == 200
    # An unauthenticated request learns nothing about routes either.
    assert call("GET", root + "/nowhere")[0] == 401


AUTH = {"Authorization": "Bearer sk-test"}


@pytest.mark.parametrize("body, status, words", [
    (b"{oops", 400, "not JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b'["a"]', 400, "JSON object"),
    (json.dumps({"model": "jaxroute-router"}).encode(), 400, "'messages' must be"),
    (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}).encode(),
     404, "'gpt-4o' not found"),
    (json.dumps({"model": "jaxroute-router", "n": 3,
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'n' must be 1"),
    (json.dumps({"model": "jaxroute-router", "max_tokens": -5,
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'max_tokens'"),
    (json.dumps({"model": "jaxroute-router", "max_tokens": 10**12,
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "[1, 160]"),
    (json.dumps({"model": "jaxroute-router", "temperature": 0.1,
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400,
     "'temperature' must be 0.7"),
    (json.dumps({"model": "jaxroute-router", "tools": [],
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400,
     "unsupported field 'tools'"),
    (json.dumps({"model": "jaxroute-router", "stream": "yes",
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'stream'"),
    (b"{" + b" " * (2 << 20) + b"}", 413, "larger than"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, words):
    srv, _ = served
    got, _, text = call("POST", srv.base_url + "/chat/completions", body, AUTH)
    err = json.loads(text)["error"]
    assert got == status and err["code"] == status and words in err["message"], text


def test_the_sdk_sees_typed_errors(served):
    srv, _ = served
    with pytest.raises(openai.NotFoundError):
        client(srv).chat.completions.create(model="nope",
                                            messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client(srv).chat.completions.create(model=CFG.model_name, n=2,
                                            messages=[{"role": "user", "content": "x"}])
    status, _, text = call("GET", srv.base_url.removesuffix("/v1") + "/nowhere", headers=AUTH)
    assert status == 404 and json.loads(text)["error"]["code"] == 404


class SlowBackend:
    """A real tiny backend behind a delay (an upstream that is slow)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.name, self.params = inner.name, inner.params
        self.temperature = inner.temperature

    def generate(self, requests, **kw):
        time.sleep(self.delay)
        return self.inner.generate(requests, **kw)


def _service(backends, rule=None, **cfg):
    rule = rule or rules.FixedRule("small only", 0)
    config = serving.ServeConfig(**{**CFG.__dict__, **cfg})
    return serving.RoutingService(backends, rule, models_of(backends), config)


def test_429_when_full_and_503_while_draining(backends):
    slow = [SlowBackend(b, 0.4) for b in backends]
    service = _service(slow, max_concurrent=1, retry_after_s=2)
    app = serving.make_app(service)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    try:
        with asgi.BackgroundServer(app) as srv, cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client(srv).chat.completions.create, model=CFG.model_name,
                                messages=msgs, max_tokens=20)
            while app.state.admission.in_flight == 0:
                time.sleep(0.01)
            status, headers, _ = call("POST", srv.base_url + "/chat/completions",
                                      json.dumps({"model": CFG.model_name,
                                                  "messages": msgs}).encode())
            assert status == 429 and headers["retry-after"] == "2"
            drained = pool.submit(serving.drain, app, 30)
            while not app.state.admission.draining:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as e:  # 503
                client(srv).chat.completions.create(model=CFG.model_name, messages=msgs)
            assert e.value.status_code == 503
            assert call("GET", srv.base_url.removesuffix("/v1") + "/health")[0] == 503
            assert first.result().choices[0].message.content  # the one in flight finished
            assert drained.result() is True
    finally:
        service.close()


def test_an_upstream_too_slow_is_a_504_and_a_dead_one_a_502(backends):
    slow = _service([SlowBackend(b, 1.0) for b in backends], request_timeout_s=0.3)
    try:
        with asgi.BackgroundServer(serving.make_app(slow)) as srv:
            with pytest.raises(openai.APIStatusError) as e:
                client(srv).chat.completions.create(
                    model=CFG.model_name, messages=[{"role": "user", "content": "1 + 2?"}])
            assert e.value.status_code == 504
    finally:
        slow.close()
    # An HTTP upstream that goes away: the request fails after the backend's retries → 502.
    with TinyLMServer({b.name: b for b in backends}) as up:
        url = up.base_url
        remote = [OpenAIBackend(b.name, base_url=url, mode="completions", max_attempts=2,
                                backoff_base=0.01, timeout=5, temperature=b.temperature)
                  for b in backends]
        for r in remote:
            r.check()
    dead = _service(remote)
    try:
        with asgi.BackgroundServer(serving.make_app(dead)) as srv:
            t0 = time.perf_counter()
            with pytest.raises(openai.APIStatusError) as e:
                client(srv).chat.completions.create(
                    model=CFG.model_name, messages=[{"role": "user", "content": "1 + 2?"}])
            assert e.value.status_code == 502 and "upstream" in e.value.message
            assert time.perf_counter() - t0 < 30  # an answer, not a hang
            assert call("GET", srv.base_url.removesuffix("/v1") + "/health")[0] == 200
    finally:
        dead.close()


def test_load_32_clients_by_10_requests_and_metrics(served):
    srv, service = served
    c = client(srv)

    def worker(w):
        out = []
        for j in range(10):
            q = QUESTIONS[(w + j) % len(QUESTIONS)]
            r = c.chat.completions.create(model=CFG.model_name, seed=w * 100 + j,
                                          messages=[{"role": "user", "content": q}])
            out.append(r)
        return out

    before = _metric(srv, 'jaxroute_requests_total{endpoint="chat.completions",status="200"}')
    with cf.ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(worker, range(32)) for r in rs]
    assert len(results) == 320
    for r in results:  # every response complete
        tr = r.model_extra["jaxroute"]
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
        assert tr["status"] in ("ok", "max_steps", "max_tokens") and tr["steps"]
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    after = _metric(srv, 'jaxroute_requests_total{endpoint="chat.completions",status="200"}')
    assert after - before == 320
    esc = sum(r.model_extra["jaxroute"]["escalated_at"] is not None for r in results)
    assert _metric(srv, "jaxroute_escalations_total") >= esc
    text = call("GET", srv.base_url.removesuffix("/v1") + "/metrics", headers=AUTH)[2]
    for name in ("jaxroute_request_latency_seconds_bucket", "jaxroute_steps_total",
                 "jaxroute_request_cost_flops_bucket", "jaxroute_saving_flops_total",
                 "jaxroute_errors_total"):
        assert name in text
    assert service.stats["requests"] > 0 and service.stats["upstream_requests"] > 0
    router_s, engine_s = _metric(srv, "jaxroute_router_seconds"), _metric(srv,
                                                                          "jaxroute_engine_seconds")
    assert 0 < router_s < engine_s  # the router's share of the engine's time is exported


def _metric(srv, name: str) -> float:
    text = call("GET", srv.base_url.removesuffix("/v1") + "/metrics", headers=AUTH)[2]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


def test_tiny_upstreams_over_http_route_as_in_process(backends, tmp_path):
    """The same router in front of the tiny-model server (raw logits, as vLLM's flag gives)
    routes as it does in front of the backends themselves — a router on the features both
    transports compute alike (over HTTP the token-distribution statistics are top-5
    estimates, in process they are exact; decision 91)."""
    legacy = make_router(tmp_path / "router", backends, features.LEGACY_FEATURE_NAMES)
    router = export.load_router(legacy, features.LEGACY_FEATURE_NAMES, NAMES)
    qs = QUESTIONS[6:10]
    with TinyLMServer({b.name: b for b in backends}, logprobs_mode="raw_logits") as up:
        remote = [OpenAIBackend(b.name, base_url=up.base_url, mode="completions",
                                confidence="max_logit", temperature=b.temperature,
                                params=b.params) for b in backends]
        service = _service(remote, rule=rules.RouterRule(router))
        try:
            with asgi.BackgroundServer(serving.make_app(service)) as srv:
                c = client(srv)
                got = [c.chat.completions.create(model=CFG.model_name, seed=5,
                                                 messages=[{"role": "user", "content": q}])
                       for q in qs]
        finally:
            service.close()
    want = online_records(backends, legacy, qs, seed=5)
    for r, rec in zip(got, want, strict=True):
        assert_same_route(r.model_extra["jaxroute"], rec, models_of(backends))


def test_a_router_for_other_models_refuses_to_start(tmp_path, router_dir):
    nets = nets_lib.make_networks(2, 5, (8,))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(0))
    norm = nets_lib.Normalizer(np.zeros(5, np.float32), np.ones(5, np.float32))
    other = export.export_router(tmp_path / "r", nets, params, norm, 0.5,
                                 feature_names=features.LEGACY_FEATURE_NAMES,
                                 model_names=["qwen-1.5b", "qwen-7b"], alpha=0.1, hidden=(8,))
    with pytest.raises(ValueError, match="give the upstreams"):
        serving.build(other)
    with pytest.raises(export.RouterSpecError, match="qwen-1.5b"):
        serving.build(other, ["tinylm:small", "tinylm:large"])
    bad_feats = export.export_router(tmp_path / "f", nets, params, norm, 0.5,
                                     feature_names=["a", "b", "c", "d", "e"],
                                     model_names=NAMES, alpha=0.1, hidden=(8,))
    with pytest.raises(ValueError, match="reads features .'a'"):
        serving.build(bad_feats)
    app, service = serving.build(router_dir)  # the built-in tiny models, tiny limits
    try:
        assert [m.name for m in service.models] == NAMES and service.config.max_tokens == 160
    finally:
        service.close()
    with pytest.raises(ValueError, match="rule"):
        serving.build(router_dir, rule="medium")


def test_parse_request_is_strict_about_types():
    cfg = serving.ServeConfig(max_tokens=100, max_tokens_per_step=10)
    ok = {"model": cfg.model_name, "messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "2 + 2?"}]}
    assert serving.parse_request(ok, True, cfg).question == "2 + 2?"
    assert serving.parse_request({**ok, "max_tokens": 7.0}, True, cfg).max_tokens == 7
    for bad in ({"max_tokens": 7.5}, {"max_tokens": True}, {"max_tokens": float("nan")},
                {"seed": "1"}, {"messages": [{"role": "user", "content": ["x"]}]},
                {"messages": []}, {"stream_options": 3}):
        with pytest.raises(asgi.RequestError) as e:
            serving.parse_request({**ok, **bad}, True, cfg)
        assert e.value.status == 400
    assert serving.parse_request({"model": cfg.model_name, "prompt": ["hi"]}, False,
                                 cfg).question == "hi"


def test_admission_counts_and_drains():
    adm = asgi.Admission(2)
    adm.enter()
    adm.enter()
    with pytest.raises(asgi.RequestError) as e:
        adm.enter()
    assert e.value.status == 429
    done = threading.Event()

    def later():
        time.sleep(0.1)
        adm.leave()
        adm.leave()
        done.set()

    threading.Thread(target=later).start()
    assert adm.drain(10) is True and done.is_set()
    with pytest.raises(asgi.RequestError) as e:
        adm.enter()
    assert e.value.status == 503


# -- hardening: one client cannot lock or poison the server (decision 83) -----------------------


def test_deeply_nested_bodies_get_400_and_never_hold_an_admission_slot(backends, router_dir):
    """Regression: "[" × 5000 raised RecursionError → 500, and the admission slot taken before
    the body read was never released: 4 such bodies locked a max_concurrent=4 server."""
    router = export.load_router(router_dir, features.FEATURE_NAMES, NAMES)
    service = _service(backends, rules.RouterRule(router), max_concurrent=4)
    app = serving.make_app(service)
    try:
        with asgi.BackgroundServer(app) as srv:
            url = srv.base_url + "/chat/completions"
            deep_inside = json.dumps({"model": CFG.model_name, "messages": [
                {"role": "user", "content": QUESTIONS[0]}], "user": [[[[[[[[[[[[[[[[[[[[[[[[[[[[
                    [[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode()
            for body in [b"[" * 5000] * 5 + [b'{"a": ' * 3000 + b"1" + b"}" * 3000,
                                             deep_inside]:
                status, _, text = call("POST", url, body)
                assert status == 400, text
                assert "nested" in json.loads(text)["error"]["message"]
            assert app.state.admission.in_flight == 0
            ok = client(srv, key="x").chat.completions.create(
                model=CFG.model_name, seed=1, messages=[{"role": "user", "content": QUESTIONS[1]}])
            assert ok.choices[0].message.content
    finally:
        service.close()


def test_a_prompt_the_upstream_cannot_take_fails_alone(backends, router_dir):
    """Regression: among 12 concurrent valid requests, one prompt the tiny upstream could not
    encode (a character outside its alphabet, or 100 000 characters) failed 7–10 of the valid
    ones with 502, quoting the bad prompt's character. Now: 400 for that request alone."""
    router = export.load_router(router_dir, features.FEATURE_NAMES, NAMES)
    service = _service(backends, rules.RouterRule(router))
    bad = ["Ada has 3 cöins. How many?", "Ada has 3 coins. " * 6000 + "How many?"]
    try:
        with asgi.BackgroundServer(serving.make_app(service)) as srv:
            c = client(srv, key="x")

            def ask(q):
                try:
                    r = c.chat.completions.create(model=CFG.model_name, seed=3,
                                                  messages=[{"role": "user", "content": q}])
                    return 200, r.choices[0].message.content
                except openai.APIStatusError as e:
                    return e.status_code, str(e)

            with cf.ThreadPoolExecutor(14) as pool:
                out = list(pool.map(ask, QUESTIONS + bad))
    finally:
        service.close()
    assert [s for s, _ in out[:12]] == [200] * 12
    assert all("ö" not in text for _, text in out[:12])
    assert [s for s, _ in out[12:]] == [400, 400]
    assert "'ö'" in out[12][1] and "context" in out[13][1]


def _idle_connections(port: int, n: int, partial_head: bytes = b"") -> list:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if partial_head:
            s.sendall(partial_head)
        socks.append(s)
    return socks


def _closed_by_server(s, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_connections_without_a_request_head_are_closed_and_capped(backends):
    """Regression: 3000 connections that never finished their headers stayed open (3016 file
    descriptors after 45 s). A head must arrive within the header timeout; connections beyond
    the cap are closed as soon as they are accepted; a real request still works."""
    service = _service(backends)
    app = serving.make_app(service)
    try:
        with asgi.BackgroundServer(app, header_timeout_s=0.5, max_connections=8) as srv:
            silent = _idle_connections(srv.port, 4)
            slow = _idle_connections(srv.port, 3, b"POST /v1/chat/completions HTTP/1.1\r\nHo")
            extra = _idle_connections(srv.port, 4)  # 11 open: 3 beyond the cap of 8
            t0 = time.perf_counter()
            closed = [_closed_by_server(s, 5.0) for s in silent + slow + extra]
            assert all(closed) and time.perf_counter() - t0 < 5.0
            for s in silent + slow + extra:
                s.close()
            r = client(srv, key="x").chat.completions.create(
                model=CFG.model_name, messages=[{"role": "user", "content": QUESTIONS[2]}])
            assert r.choices[0].message.content
    finally:
        service.close()


def test_models_and_health_report_the_routers_guarantee(backends, router_dir, tmp_path):
    """/v1/models and /health say what the served κ promises (decision 88): a router exported
    with a PAC guarantee reports kind, α, δ and its calibration size; one exported before PAC
    existed reports the marginal guarantee at its α."""
    import shutil


    pac_dir = tmp_path / "pac"
    shutil.copytree(router_dir, pac_dir)
    meta = json.loads((pac_dir / "router.json").read_text())
    meta["guarantee"] = guarantee.guarantee(0.1, 0.05, 150)
    (pac_dir / "router.json").write_text(json.dumps(meta))
    for folder, want in ((router_dir, {"kind": "marginal", "alpha": 0.1, "delta": None}),
                         (pac_dir, {"kind": "pac", "alpha": 0.1, "delta": 0.05,
                                    "calibration_problems": 150})):
        router = export.load_router(folder, features.FEATURE_NAMES, NAMES)
        service = serving.RoutingService(backends, rules.RouterRule(router), models_of(backends),
                                         CFG)
        with asgi.BackgroundServer(serving.make_app(service)) as srv:
            listed = client(srv).models.list().data[0].model_extra["guarantee"]
            status, _, body = call("GET", srv.base_url.removesuffix("/v1") + "/health")
        service.close()
        assert status == 200
        for got in (listed, json.loads(body)["guarantee"]):
            assert {k: got[k] for k in want} == want and got["kappa"] == router.kappa


class GatedBackend:
    """A backend whose calls wait until the test opens the gate (a request held in flight),
    counting the calls made."""

    def __init__(self, inner):
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.temperature = inner.temperature
        self.gate, self.calls = threading.Event(), 0

    def generate(self, requests, **kw):
        self.calls += 1
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.generate(requests, **kw)


def _body(question: str, **fields) -> bytes:
    return json.dumps({"model": CFG.model_name, "messages": [{"role": "user",
                                                             "content": question}],
                       **fields}).encode()


def test_slow_bodies_never_hold_an_admission_slot(backends):
    """Regression: 16 sockets that sent `Content-Length: 99999` and one byte held all 16 slots
    for the read timeout, and every valid request was a 429. A slot is now taken only once a
    whole, valid body is in hand (decision 90)."""
    service = _service(backends, max_concurrent=4, read_timeout_s=20)
    try:
        with asgi.BackgroundServer(serving.make_app(service)) as srv:
            slow = _idle_connections(srv.port, 8, b"POST /v1/chat/completions HTTP/1.1\r\n"
                                     b"Host: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 99999\r\n\r\n{")
            time.sleep(0.3)
            statuses = [call("POST", srv.base_url + "/chat/completions",
                             _body(QUESTIONS[i], max_tokens=8))[0] for i in range(3)]
            assert statuses == [200, 200, 200]
            assert service.engine.live == [] and slow
            for s in slow:
                s.close()
    finally:
        service.close()


def test_idle_connections_are_shed_so_a_new_client_always_gets_in(backends):
    """Regression: a client holding more idle sockets than `max_connections` (reopening any
    that were closed) made every /health call fail. Now the oldest idle connection is closed
    to make room, so /health and a request get in while the flood holds on."""
    service = _service(backends)
    cap, flood = 16, 24
    try:
        with asgi.BackgroundServer(serving.make_app(service), header_timeout_s=60,
                                   max_connections=cap) as srv:
            held, stop, reopened = _idle_connections(srv.port, flood), threading.Event(), [0]

            def keep_open():  # the attacker: any socket the server closes is opened again
                while not stop.is_set():
                    for i, s in enumerate(held):
                        if _closed_by_server(s, 0.001):
                            s.close()
                            held[i] = socket.create_connection(("127.0.0.1", srv.port), 5)
                            reopened[0] += 1
            attacker = threading.Thread(target=keep_open, daemon=True)
            attacker.start()
            time.sleep(0.3)
            health = [call("GET", srv.base_url.removesuffix("/v1") + "/health")[0]
                      for _ in range(5)]
            answer = call("POST", srv.base_url + "/chat/completions",
                          _body(QUESTIONS[1], max_tokens=8))[0]
            stop.set()
            attacker.join(10)
            for s in held:
                s.close()
        assert health == [200] * 5 and answer == 200
        assert reopened[0] >= 6  # the flood really was shed (and came back)
    finally:
        service.close()


def test_a_client_that_leaves_is_cancelled_and_frees_its_slot(backends):
    """Regression: a request whose client disconnected ran to its end and held its slot. Now
    the engine drops it before its next round: no further upstream call is made for it and the
    slot is free for the next client (decision 90)."""
    question = QUESTIONS[0]
    engine = online.Engine(backends, rules.FixedRule("small only", 0),
                           online.OnlineConfig(CFG.max_steps, 64, 160))
    live = engine.admit(Problem(serving.problem_id(question), question, "", "served"))
    engine.run()
    assert len(live.pieces) >= 2  # left alone it takes more than one round
    gated = [GatedBackend(b) for b in backends]
    service = _service(gated, max_concurrent=1)
    app = serving.make_app(service)
    try:
        with asgi.BackgroundServer(app) as srv:
            s = socket.create_connection((srv.host, srv.port), 5)
            body = _body(question)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while gated[0].calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            s.close()  # the client leaves while its first step is being written
            time.sleep(0.3)
            calls = gated[0].calls
            for g in gated:
                g.gate.set()
            while app.state.admission.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.admission.in_flight == 0
            assert gated[0].calls == calls  # nothing more was generated for it
            r = client(srv, key="x").chat.completions.create(
                model=CFG.model_name, messages=[{"role": "user", "content": QUESTIONS[3]}])
            assert r.choices[0].message.content
    finally:
        service.close()


def test_max_tokens_is_a_budget_for_the_whole_answer_and_a_cut_says_length(served):
    """Regression: after an escalation the large model's rest got the whole max_tokens (a
    43-token answer for max_tokens=30) and a cut answer said "stop". Now the budget holds
    across models and any truncation — the budget, a step limit, an upstream's "length" —
    finishes "length"; an answer that fits is the same as without the limit."""
    srv, _ = served
    c = client(srv)
    cut = 0
    for q in QUESTIONS[:6]:
        free = c.chat.completions.create(model=CFG.model_name, seed=5,
                                          messages=[{"role": "user", "content": q}])
        need = free.model_extra["jaxroute"]["answer_tokens"]
        for budget in (5, 12, 30):
            r = c.chat.completions.create(model=CFG.model_name, seed=5, max_tokens=budget,
                                          messages=[{"role": "user", "content": q}])
            got = r.model_extra["jaxroute"]["answer_tokens"]
            assert got <= budget, (q, budget, got)
            if need > budget:
                cut += 1
                assert r.choices[0].finish_reason == "length", (q, budget)
            elif free.choices[0].finish_reason == "stop":
                assert r.choices[0].message.content == free.choices[0].message.content
    assert cut >= 6  # most of these answers are longer than 12 tokens


def test_a_second_stop_answers_everyone_503_and_leaves_nothing_running(backends):
    """Regression: a second SIGTERM turned requests in flight into `500 CancelledError` (and the
    old engine thread died with "Event loop is closed"). `serving.abort` (what `launch.serve`
    calls on the second signal) answers them 503 at once and cancels their tasks."""
    gated = [GatedBackend(b) for b in backends]
    service = _service(gated)
    app = serving.make_app(service)
    try:
        with asgi.BackgroundServer(app) as srv, cf.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(call, "POST", srv.base_url + "/chat/completions",
                                _body(QUESTIONS[0]))
            streamed = pool.submit(call, "POST", srv.base_url + "/chat/completions",
                                   _body(QUESTIONS[1], stream=True))
            deadline = time.monotonic() + 10
            while app.state.admission.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            serving.abort(app)
            status, _, text = plain.result(10)
            assert status == 503 and "shutting down" in text
            status, _, text = streamed.result(10)
            assert status == 200 and '"code": 503' in text and "shutting down" in text
            assert call("GET", srv.base_url.removesuffix("/v1") + "/health")[0] == 503
        for g in gated:
            g.gate.set()  # the step call in flight ends after the server's loop is gone
        time.sleep(0.5)
        assert not service._tasks  # every request's task was cancelled and has ended
    finally:
        service.close()


def test_router_json_edits_are_refused_at_load(backends, router_dir, tmp_path):
    """Regression: swapped `model_names` served the large model as model 0 without a word, and
    `"guarantee": "x"` started, then /health and /v1/models answered 500 forever. router.json
    is now checked whole at load (decision 90)."""
    import shutil

    def edited(name, change):
        folder = tmp_path / name
        shutil.copytree(router_dir, folder)
        meta = json.loads((folder / "router.json").read_text())
        meta["models"] = [{"name": m.name, "params": m.params, "price_input": 0.0,
                           "price_cached_input": 0.0, "price_output": 0.0}
                          for m in models_of(backends)]
        change(meta)
        (folder / "router.json").write_text(json.dumps(meta))
        return folder

    good = edited("good", lambda m: None)
    assert export.load_router(good).meta["model_names"] == NAMES
    cases = {
        "names": (lambda m: m.update(model_names=NAMES[::-1]), "disagrees with the model"),
        "both": (lambda m: m.update(model_names=NAMES[::-1], models=m["models"][::-1]),
                 "small → large"),
        "guarantee": (lambda m: m.update(guarantee="x"), "'guarantee'"),
        "alpha": (lambda m: m.update(guarantee=guarantee.guarantee(0.3)), "router's α"),
        "delta": (lambda m: m.update(guarantee={"kind": "pac", "alpha": 0.1, "delta": None}),
                  "'delta'"),
    }
    for name, (change, words) in cases.items():
        folder = edited(name, change)
        with pytest.raises(export.RouterSpecError, match=words):
            export.load_router(folder)
        with pytest.raises(export.RouterSpecError, match=words):
            serving.build(str(folder))


def test_an_integer_python_cannot_read_is_a_400(served):
    """Regression: a 5000-digit integer in a body was a 500 and a traceback (decision 90)."""
    srv, _ = served
    body = ('{"model": "' + CFG.model_name + '", "seed": ' + "9" * 5000 + ', "messages": '
            '[{"role": "user", "content": "1 + 1?"}]}').encode()
    status, _, text = call("POST", srv.base_url + "/chat/completions", body,
                           {"Authorization": "Bearer sk-test"})
    assert status == 400 and "cannot read" in text and len(text) < 1000
