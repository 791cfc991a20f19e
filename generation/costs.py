"""Costs: 2N FLOPs per generated token, and USD from API usage with a configurable price table.

Prices are USD per 1M tokens: (input, cached input, output).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxroute.errors import InputError


@dataclasses.dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float


DEFAULT_PRICES = {
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
}


def step_flops(completion_tokens: int, params: float) -> float:
    """Generation FLOPs of a step: 2N per generated token (the paper's convention)."""
    return 2.0 * params * completion_tokens


def prefill_flops(prompt_tokens: int, cached_tokens: int, params: float) -> float:
    """Optional separate column: 2N per prompt token that was not served from the prefix cache."""
    return 2.0 * params * max(prompt_tokens - cached_tokens, 0)


def generation_cost(r, params: float) -> dict:
    """A generated piece's cost record (trace format): generation FLOPs (2N per generated token,
    the paper's cost) and token counts; prefill FLOPs of the uncached prompt are a separate
    column, not part of "flops". `r` is a `generation.backend.StepResult`."""
    return {"flops": step_flops(r.completion_tokens, params),
            "input_tokens": int(r.prompt_tokens), "cached_input_tokens": int(r.cached_tokens),
            "output_tokens": int(r.completion_tokens),
            "prefill_flops": prefill_flops(r.prompt_tokens, r.cached_tokens, params)}


def usd(prompt_tokens: int, cached_tokens: int, completion_tokens: int, price: Price) -> float:
    """(P − C)·p_in + C·p_cached + O·p_out, per 1M tokens."""
    cached = min(cached_tokens or 0, prompt_tokens)
    return ((prompt_tokens - cached) * price.input + cached * price.cached_input
            + completion_tokens * price.output) / 1e6


def params_from_config(path: str | Path | dict) -> float:
    """Parameter count N of a decoder-only transformer from its Hugging Face `config.json` (a
    folder, the file, or the config as a dict).

    N = embeddings (+ untied LM head) + L × (attention + MLP + norms): attention with grouped
    KV heads (q, o: h²; k, v: h·kv_dim each), gated MLP 3·h·I (Llama/Qwen), or 2·h·I if
    `hidden_act` is not gated. Biases are ignored (< 0.1%).
    """
    if isinstance(path, dict):
        cfg, path = path, "config"
    else:
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    try:
        h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        inter = cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
    except KeyError as e:
        raise InputError(f"{path}: config.json lacks {e.args[0]!r}") from None
    kv_heads = cfg.get("num_key_value_heads", heads)
    kv_dim = h // heads * kv_heads
    attn = 2 * h * h + 2 * h * kv_dim
    gated = cfg.get("hidden_act", "silu") in ("silu", "swiglu", "gelu_pytorch_tanh", "geglu")
    mlp = (3 if gated else 2) * h * inter
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return float(embed + layers * (attn + mlp + 2 * h) + h)
