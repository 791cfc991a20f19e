"""The OpenAI backend against a real HTTP server on loopback, with injected faults."""

import math

import pytest
from openai_server import FakeOpenAI

from generation.backends import costs
from generation.backends.base import StepRequest
from generation.backends.openai_backend import OpenAIBackend


def backend(server, tmp_path=None, **kw):
    opts = dict(base_url=server.base_url, api_key="test", backoff_base=0.01, backoff_max=0.05,
                timeout=5.0, price=costs.DEFAULT_PRICES["gpt-4.1-mini"])
    opts.update(kw)
    return OpenAIBackend("gpt-4.1-mini", cache_path=(tmp_path / "cache.sqlite") if tmp_path
                         else None, **opts)


REQ = StepRequest("p0/r0/0", "What is 2+3?", (), None, seed=7)


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_stepwise_generation_and_parsing(mode):
    with FakeOpenAI() as srv:
        be = backend(srv, mode=mode)
        r = be.generate([REQ])[0]
        assert r.error is None and r.text == "Step 1: look at 2 and 3." and not r.is_final
        assert r.tokens == r.text.split(" ") and r.completion_tokens == len(r.tokens)
        assert r.confidence_kind == "top1_prob"
        assert r.confidence[0] == pytest.approx(math.exp(-0.05))
        assert r.confidence[4] == pytest.approx(math.exp(-0.7))  # "2" — a digit token
        assert r.cached_tokens == 16 and r.prompt_tokens > 16
        sent = srv.requests[-1]
        assert sent["stop"] == ["\n\n"] and sent["seed"] == 7 and sent["temperature"] == 0.7
        if mode == "chat":
            assert sent["logprobs"] is True and sent["top_logprobs"] == 5
        else:
            assert sent["logprobs"] == 5 and sent["prompt"].endswith("<|im_start|>assistant\n")
        # Continuation: the steps so far travel with the next request.
        req2 = StepRequest("p0/r0/2", REQ.question, ("Step 1: a.", "Step 2: b."), None, 1)
        r2 = be.generate([req2])[0]
        assert r2.is_final and "\\boxed{5}" in r2.text
        if mode == "chat":
            assert "Partial solution so far" in srv.requests[-1]["messages"][1]["content"]
        else:
            assert srv.requests[-1]["prompt"].endswith("Step 1: a.\n\nStep 2: b.\n\n")
        whole = be.generate([REQ], whole=True)[0]
        assert whole.is_final and "stop" not in srv.requests[-1]


def test_usd_from_usage():
    with FakeOpenAI() as srv:
        be = backend(srv)
        r = be.generate([REQ])[0]
    expect = ((r.prompt_tokens - 16) * 0.40 + 16 * 0.10 + r.completion_tokens * 1.60) / 1e6
    assert be.usd(r) == pytest.approx(expect)


def test_retries_on_429_500_timeout_and_malformed_bodies():
    with FakeOpenAI() as srv:
        srv.faults = ["429", "500", "timeout", "malformed"]
        srv.delay = 1.5
        be = backend(srv, timeout=0.5, max_attempts=6)
        r = be.generate([REQ])[0]
        assert r.error is None and r.text.startswith("Step 1")
        assert len(srv.requests) == 5 and be.stats["retries"] == 4


def test_no_retry_on_client_errors_and_errors_are_per_request():
    with FakeOpenAI() as srv:
        srv.faults = ["400"]
        be = backend(srv, concurrency=1)
        out = be.generate([REQ, StepRequest("p1/r0/0", "What is 4+4?", (), None, 1)])
        assert out[0].error is not None and "BadRequest" in out[0].error
        assert out[1].error is None and len(srv.requests) == 2


@pytest.mark.parametrize(("message", "room"), [
    # vLLM 0.32's server refuses a limit over its whole context and clamps a smaller one itself
    # (the message of the real server, seen by tests/test_real_engine.py):
    ("max_tokens=1024 cannot be greater than max_model_len=192. Please request fewer output "
     "tokens. (parameter=max_tokens, value=1024)", 192),
    ("max_completion_tokens=1024 cannot be greater than max_model_len=512.", 512),
    # the OpenAI API names the prompt's share:
    ("This model's maximum context length is 4096 tokens. However, you requested 4200 tokens "
     "(3176 in the messages, 1024 in the completion).", 920),
])
@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_a_step_limit_over_the_context_is_asked_again_with_what_it_leaves(message, room, mode):
    """Regression (decision 85): max_tokens_per_step sent unclamped was refused on every step by
    a server whose context is shorter than prompt + limit. The backend asks again once with the
    room the refusal names, and counts the clamp."""
    with FakeOpenAI() as srv:
        srv.faults = [f"context:{message}"]
        be = backend(srv, mode=mode)
        r = be.generate([REQ], max_tokens=1024)[0]
        assert r.error is None and r.text
        assert be.stats["context_clamps"] == 1 and be.stats["retries"] == 0
        key = "max_tokens" if mode == "completions" else "max_completion_tokens"
        assert [b[key] for b in srv.requests] == [1024, room]


def test_a_prompt_over_the_context_stays_the_requests_own_failure():
    with FakeOpenAI() as srv:
        srv.faults = ["context:This model's maximum context length is 192 tokens. However, your "
                      "prompt contains 300 input tokens, which exceeds this limit even without "
                      "any output tokens."]
        be = backend(srv, mode="completions")
        r = be.generate([REQ], max_tokens=64)[0]
        assert r.error and "maximum context length" in r.error
        assert be.stats["context_clamps"] == 0 and len(srv.requests) == 1


def test_circuit_breaker_fails_fast():
    with FakeOpenAI() as srv:
        srv.faults = ["500"] * 100
        be = backend(srv, max_attempts=2, breaker_threshold=2, concurrency=1)
        reqs = [StepRequest(f"p{i}", f"What is {i}+1?", (), None, i) for i in range(6)]
        out = be.generate(reqs)
        assert all(r.error for r in out)
        assert sum("circuit open" in r.error for r in out) == 4
        assert len(srv.requests) == 4  # two requests × two attempts, then nothing


def test_cache_pays_nothing_twice(tmp_path):
    with FakeOpenAI() as srv:
        be = backend(srv, tmp_path)
        a = be.generate([REQ])[0]
        n = len(srv.requests)
        b = backend(srv, tmp_path).generate([REQ])[0]  # a new process would reopen the file
        assert len(srv.requests) == n and a == b
        # A different seed is a different request.
        backend(srv, tmp_path).generate([StepRequest(REQ.key, REQ.question, (), None, 8)])
        assert len(srv.requests) == n + 1


def test_step_verifier_prompt_and_strict_parsing(tmp_path):
    from generation.traces import verifier

    assert verifier.parse_verdict(" Correct.") is True
    assert verifier.parse_verdict("incorrect") is False
    for bad in ("correct, because 2+2=4", "maybe", "", None, "correct | incorrect"):
        assert verifier.parse_verdict(bad) is None
    text = verifier.render("What is 2+3?", ["Step 1: a."], "Step 2: b.")
    assert "Question:\nWhat is 2+3?" in text and "Previous steps:\nStep 1: a." in text
    assert text.rstrip().endswith("Verdict:\ncorrect | incorrect")
    with FakeOpenAI() as srv:
        be = backend(srv, tmp_path)
        v = verifier.StepVerifier(be)
        got = v([("What is 2+3?", [], "Step 1: x."), ("What is 2+3?", ["a"], "a wrong step")])
        assert got == [True, False]
        assert srv.requests[-1]["messages"][0]["content"].startswith("Task: Determine")
        n = len(srv.requests)
        assert verifier.StepVerifier(backend(srv, tmp_path))([("What is 2+3?", [], "Step 1: x.")]
                                                             ) == [True]
        assert len(srv.requests) == n  # cached


# -- credentials, fatal failures, the one retry policy (decision 71) --------------------------

from generation.backends.retry import CircuitBreaker, FatalBackendError  # noqa: E402


def test_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with FakeOpenAI(api_key="sk-from-env") as srv:
        be = OpenAIBackend("gpt-4.1-mini", base_url=srv.base_url, backoff_base=0.01)
        assert be.generate([REQ])[0].error is None
        assert set(srv.auth_headers) == {"Bearer sk-from-env"}


def test_no_key_for_the_official_api_stops_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(FatalBackendError, match="OPENAI_API_KEY"):
        OpenAIBackend("gpt-4.1-mini")


@pytest.mark.parametrize("server_kw, be_kw, match", [
    (dict(api_key="right"), dict(api_key="wrong"), "refused the API key.*OPENAI_API_KEY"),
    (dict(models=["other-model"]), {}, "does not serve model 'gpt-4.1-mini'.*--models"),
])
def test_refused_key_or_unknown_model_stop_at_once(server_kw, be_kw, match):
    with FakeOpenAI(**server_kw) as srv:
        be = backend(srv, **be_kw)
        with pytest.raises(FatalBackendError, match=match):
            be.generate([REQ])
        assert srv.requests == []  # the preflight stopped it: nothing was generated


def test_a_404_mid_run_and_a_dead_server_are_fatal():
    with FakeOpenAI() as srv:
        srv.faults = ["404"]
        with pytest.raises(FatalBackendError, match="404 for model.*--models"):
            backend(srv).generate([REQ])
        port = srv.server_address[1]
    with pytest.raises(FatalBackendError, match="cannot reach.*--models"):
        OpenAIBackend("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                      timeout=1.0).generate([REQ])


def test_breaker_closes_after_its_cooldown_with_one_probe():
    now = [0.0]
    br = CircuitBreaker(threshold=2, cooldown=10.0, clock=lambda: now[0])
    assert br.allow()
    br.record(False)
    br.record(False)
    assert br.state == "open" and not br.allow()
    now[0] = 10.5
    assert br.allow() and not br.allow()  # one probe while half-open
    br.record(False)
    assert br.state == "open"  # the probe failed: open again, a new cool-down
    now[0] = 21.0
    assert br.allow()
    br.record(True)
    assert br.state == "closed" and br.allow() and br.allow()


def test_breaker_recovers_on_the_wire():
    import time as _time

    with FakeOpenAI() as srv:
        srv.faults = ["500"] * 4
        be = backend(srv, max_attempts=2, breaker_threshold=2, breaker_cooldown=0.3,
                     concurrency=1)
        out = be.generate([StepRequest(f"p{i}", f"What is {i}+1?", (), None, i)
                           for i in range(3)])
        assert all(r.error for r in out) and "circuit open" in out[-1].error
        _time.sleep(0.35)
        assert be.generate([REQ])[0].error is None  # the half-open probe succeeded
        assert be.breaker.state == "closed"


def test_retry_after_is_honoured():
    import time as _time

    with FakeOpenAI() as srv:
        srv.faults = ["retry-after:1"]
        be = backend(srv)
        t0 = _time.perf_counter()
        assert be.generate([REQ])[0].error is None
        assert _time.perf_counter() - t0 >= 0.95 and be.stats["retries"] == 1


@pytest.mark.parametrize("fault", ["nologprobs", "nullcontent"])
def test_invalid_bodies_are_retried_and_never_cached(tmp_path, fault):
    with FakeOpenAI() as srv:
        srv.faults = [fault]
        be = backend(srv, tmp_path, max_attempts=1)
        r = be.generate([REQ])[0]
        assert r.error is not None and REQ.key in r.error  # names the request
        n = len(srv.requests)
        again = backend(srv, tmp_path).generate([REQ])[0]  # not served from the cache
        assert again.error is None and len(srv.requests) == n + 1
        srv.faults = [fault]
        be2 = backend(srv, tmp_path, max_attempts=2)
        assert be2.generate([StepRequest("k2", "What is 3+3?", (), None, 3)])[0].error is None


def test_an_error_rate_above_the_limit_stops_the_run():
    with FakeOpenAI() as srv:
        srv.faults = ["400"] * 50
        be = backend(srv, max_error_rate=0.3, min_requests=5, concurrency=1)
        reqs = [StepRequest(f"p{i}", f"What is {i}+1?", (), None, i) for i in range(20)]
        with pytest.raises(FatalBackendError, match="failed.*max_error_rate"):
            be.generate(reqs)
        assert be.summary()["failure_reasons"] == {"BadRequestError": be.stats["failures"]}


def test_judge_and_verifier_calls_share_the_retry_policy():
    with FakeOpenAI() as srv:
        srv.faults = ["500", "429"]
        be = backend(srv)
        got = be.chat_texts([[{"role": "user", "content": "Task: Determine x\nLast step:\nok"}]])
        assert got == ["Correct."] and be.stats["retries"] == 2
        srv.faults = ["401"]
        with pytest.raises(FatalBackendError, match="OPENAI_API_KEY"):
            be.chat_texts([[{"role": "user", "content": "Task: Determine y\nLast step:\nok"}]])


def test_completions_eos_without_an_answer_ends_the_solution():
    with FakeOpenAI() as srv:
        be = backend(srv, mode="completions")
        assert not be.generate([REQ])[0].is_final  # stopped by "\n\n" (stop_reason "\n\n")
        srv.faults = ["eos"]
        r = be.generate([StepRequest("k", "What is 1+1?", (), None, 5)])[0]
        assert r.is_final and r.text == "The end"


def test_raw_logit_servers_get_max_logit_confidence():
    from generation.registry import make_backend

    with FakeOpenAI() as srv:
        be = make_backend(f"openai-completions-raw:tiny@{srv.base_url}", api_key="x")
        assert be.confidence == "max_logit" and be.mode == "completions"
        assert make_backend(f"openai:tiny@{srv.base_url}", api_key="x").confidence == "top1_prob"


def test_specs_and_urls_lose_their_credentials():
    from generation.backends.base import redact_spec, redact_url

    assert redact_url("https://u:pw@host:8443/v1?x=1") == "https://host:8443/v1?x=1"
    assert redact_url("http://host/v1") == "http://host/v1" and redact_url(None) is None
    assert redact_spec("openai:m@http://u:pw@h/v1") == "openai:m@http://h/v1"
    assert redact_spec("vllm:/models/q") == "vllm:/models/q" and redact_spec(None) is None


def test_errors_name_the_server_without_its_credentials():
    with FakeOpenAI(api_key="right") as srv:
        be = OpenAIBackend("m", base_url=srv.base_url.replace("//", "//user:s3cret@"),
                           api_key="wrong")
        with pytest.raises(FatalBackendError) as e:
            be.check()
    assert "s3cret" not in str(e.value) and "127.0.0.1" in str(e.value)
