"""The OpenAI backend against a real HTTP server on loopback, with injected faults."""

import math

import pytest
from openai_server import FakeOpenAI

from generation import costs
from generation.backend import StepRequest
from generation.openai_backend import OpenAIBackend


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
    from generation import verifier

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
