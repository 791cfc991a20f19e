"""The latency model of the paper's setups (`generation.backends.latency`, decision 95)."""

import pytest

from generation.backends import latency


def _step(model, tokens, kept=True, overrun=False):
    return {"model_index": model, "tokens": tokens, "kept": kept, "overrun": overrun}


def test_an_escalated_answer_is_priced_in_order_and_its_overrun_costs_no_time():
    speed = latency.Speed(decode_s=(1.0, 3.0), prefill_s=(0.1, 0.2))
    steps = [_step(0, 10), _step(0, 5, kept=False), _step(0, 3, kept=False, overrun=True),
             _step(1, 20)]
    # small: prompt prefill + its 15 tokens; large: prefill of prompt + the kept 10 + 20 tokens
    want = 8 * 0.1 + 15 * 1.0 + (8 + 10) * 0.2 + 20 * 3.0
    assert latency.answer_seconds(steps, 8, speed) == pytest.approx(want)
    assert latency.answer_seconds(steps, 8, speed, scale=2.0) == pytest.approx(2 * want)
    large_only = [_step(1, 30)]
    assert latency.answer_seconds(large_only, 8, speed) == pytest.approx(8 * 0.2 + 90.0)


def test_the_published_speeds_and_a_router_that_never_leaves_the_large_model():
    s = latency.QWEN25_A100
    assert s.decode_s == pytest.approx((1 / 183.33, 1 / 84.28))
    assert 0 < s.prefill_s[0] < s.prefill_s[1] < s.decode_s[0]  # prefill ≪ decode per token
    tr = [{"steps": [_step(1, n)], "prompt_tokens": 50} for n in (30, 40, 50)]
    m = latency.expected_ratio(tr, tr, s, large_tokens=290)
    assert m["ratio_p50"] == pytest.approx(1.0) and m["scale"] == pytest.approx(290 / 40)
    small = [{"steps": [_step(0, n)], "prompt_tokens": 50} for n in (30, 40, 50)]
    m = latency.expected_ratio(small, tr, s)
    assert m["ratio_p50"] == pytest.approx((50 * s.prefill_s[0] + 40 * s.decode_s[0])
                                           / (50 * s.prefill_s[1] + 40 * s.decode_s[1]))
    assert m["escalated"] == 0.0
