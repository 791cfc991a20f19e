"""The vLLM backend through faithful fakes of vLLM's objects (no GPU here)."""

import fake_vllm
import pytest

from generation.backend import StepRequest
from generation.vllm_backend import VLLMBackend


def make(**kw):
    return VLLMBackend("fake-1.5b", params=1.5e9, vllm_module=fake_vllm.module(), **kw)


def test_engine_arguments_and_raw_logit_confidence():
    be = make(tensor_parallel_size=2)
    kw = fake_vllm.LLM.instances[-1].kw
    assert kw["logprobs_mode"] == "raw_logits" and kw["enable_prefix_caching"] is True
    assert kw["tensor_parallel_size"] == 2 and kw["generation_config"] == "vllm"
    r = be.generate([StepRequest("p0/0", "What is 2+3?", (), (), seed=11)])[0]
    assert r.text == "Step 1: think." and not r.is_final and r.error is None
    # Max over {sampled, rank-1}: the rank-1 raw logit; digits get 30, others 20.
    assert r.confidence_kind == "max_logit"
    assert r.confidence[r.tokens.index("1")] == 30.0 and r.confidence[0] == 20.0
    assert r.token_ids[-2:] == [10, 10]  # the stop's newline tokens stay in the ids
    sp = be.llm.calls[-1][1][0]
    assert sp.temperature == 0.7 and sp.stop == ["\n\n"] and sp.logprobs == 1 and sp.seed == 11


def test_token_continuation_prefix_cache_and_final_step():
    be = make()
    q = "What is 4+5?"
    r1 = be.generate([StepRequest("a", q, (), (), 1)])[0]
    r2 = be.generate([StepRequest("b", q, (r1.text,), tuple(r1.token_ids), 2)])[0]
    # The second prompt is the first prompt's ids plus the generated ids, exactly.
    p1 = be.llm.calls[0][0][0]["prompt_token_ids"]
    p2 = be.llm.calls[1][0][0]["prompt_token_ids"]
    assert p2 == p1 + r1.token_ids
    assert r2.text == "Step 2: think." and r2.cached_tokens > 0
    r3 = be.generate([StepRequest("c", q, (r1.text, r2.text), tuple(r1.token_ids + r2.token_ids),
                                  3)])[0]
    assert r3.is_final and r3.text == "= 9 \\boxed{9}" and r3.finish_reason == "stop"
    # Text route (no ids) and whole-solution mode.
    w = be.generate([StepRequest("d", q, (r1.text,), None, 4)], whole=True)[0]
    assert w.is_final and "\\boxed{9}" in w.text and be.llm.calls[-1][1][0].stop is None


def test_batches_all_waiting_problems_in_one_call():
    be = make()
    reqs = [StepRequest(f"p{i}", f"What is {i}+1?", (), (), i) for i in range(5)]
    out = be.generate(reqs)
    assert len(be.llm.calls) == 1 and len(out) == 5


def test_params_from_config_required_for_remote_names():
    with pytest.raises(ValueError, match="params not given"):
        VLLMBackend("org/not-local", vllm_module=fake_vllm.module())
