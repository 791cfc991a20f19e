"""The latency a routed answer would have on the paper's models (decision 95): per-token decode
and prefill times of Qwen2.5 1.5B and 7B served by vLLM on one GPU, applied to the token counts
of answers routed here (the escalation profile), against the large model alone.

Published figures: the Qwen team's speed benchmark (QwenLM/Qwen2.5, docs/source/benchmark/
speed_benchmark.rst, "Qwen2.5 Speed Benchmark"): vLLM 0.6.3, BF16, batch size 1, one NVIDIA
A100 80GB, 2048 generated tokens — Qwen2.5-1.5B-Instruct 183.33 tokens/s and Qwen2.5-7B-Instruct
84.28 tokens/s from a 1-token input, 176.68 and 80.70 tokens/s from a 6144-token input.
Qwen2.5-Math-1.5B/7B (the paper's pair) have the same architectures. Decode time per token is
the inverse of the first; prefill time per prompt token is bounded by the second: the extra
time of the 6144-token run over 6144 (it also holds the slower decode over a longer context, so
this overstates prefill).

An answer is sequential at one client: the small model's prefill of the prompt and its tokens
up to and including the escalated draft (tokens a stream wrote past a decision — `overrun` —
run while the decision is made, so they cost FLOPs, not time), then, when escalated, the large
model's prefill of the prompt and the accepted prefix and its tokens. Queueing, network and
the router's decision (milliseconds: the server's `/metrics`) are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SOURCE = ("Qwen2.5 Speed Benchmark (QwenLM/Qwen2.5 docs/source/benchmark/speed_benchmark.rst): "
          "vLLM 0.6.3, BF16, batch 1, 1× A100 80GB")
_GENERATED = 2048


@dataclasses.dataclass(frozen=True)
class Speed:
    """Seconds per token of each model (small, large)."""

    decode_s: tuple[float, float]
    prefill_s: tuple[float, float]
    source: str = SOURCE


def _from_benchmark(short: float, long: float, long_input: int = 6144) -> tuple[float, float]:
    """(decode s/token, prefill s/token bound) from tokens/s at a 1- and a long-token input."""
    return 1.0 / short, max(0.0, (_GENERATED / long - _GENERATED / short) / long_input)


_S, _L = _from_benchmark(183.33, 176.68), _from_benchmark(84.28, 80.70)
QWEN25_A100 = Speed(decode_s=(_S[0], _L[0]), prefill_s=(_S[1], _L[1]))


def answer_seconds(steps: Sequence[dict], prompt_tokens: float, speed: Speed,
                   scale: float = 1.0) -> float:
    """Expected seconds of one answer from its routing trace (`steps` of the server's
    `jaxroute` object: model index, tokens, kept, overrun), token counts × `scale`."""
    small = large = prefix = 0.0
    for s in steps:
        if s.get("overrun"):
            continue
        if s["model_index"] == 0:
            small += s["tokens"]
            prefix += s["tokens"] if s["kept"] else 0
        else:
            large += s["tokens"]
    p = prompt_tokens * scale
    starts_small = bool(steps) and steps[0]["model_index"] == 0
    t = (p * speed.prefill_s[0] + small * scale * speed.decode_s[0]) if starts_small else 0.0
    if large:
        t += (p + (prefix * scale if starts_small else 0.0)) * speed.prefill_s[1]
        t += large * scale * speed.decode_s[1]
    return t


def expected_ratio(router: Sequence[dict], large: Sequence[dict], speed: Speed = QWEN25_A100,
                   large_tokens: float | None = None) -> dict[str, float]:
    """Router ÷ large-only expected latency (p50 and mean) over routing traces of both rules on
    the same questions. `large_tokens`: the paper's large-model answer length, to scale the
    tokens here to (None: as measured)."""
    def tokens(tr):
        return sum(s["tokens"] for s in tr["steps"] if not s.get("overrun"))

    measured = float(np.mean([tokens(t) for t in large]))
    scale = (large_tokens / measured) if large_tokens and measured > 0 else 1.0
    prompt = float(np.median([t.get("prompt_tokens", 0) for t in large]))
    r = np.array([answer_seconds(t["steps"], prompt, speed, scale) for t in router])
    lg = np.array([answer_seconds(t["steps"], prompt, speed, scale) for t in large])
    return {"router_p50_s": float(np.median(r)), "large_p50_s": float(np.median(lg)),
            "ratio_p50": float(np.median(r) / np.median(lg)),
            "ratio_mean": float(r.mean() / lg.mean()), "scale": scale,
            "escalated": float(np.mean([any(s["model_index"] > 0 for s in t["steps"])
                                        for t in router]))}
