"""Costs: 2N FLOPs per generated token, and USD from API usage with a configurable price table.

Prices are USD per 1M tokens: (input, cached input, output).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

from generation.backends.base import Backend
from jaxroute import trace
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
    column, not part of "flops". `r` is a `generation.backends.base.StepResult`."""
    return {"flops": step_flops(r.completion_tokens, params),
            "input_tokens": int(r.prompt_tokens), "cached_input_tokens": int(r.cached_tokens),
            "output_tokens": int(r.completion_tokens),
            "prefill_flops": prefill_flops(r.prompt_tokens, r.cached_tokens, params)}


def usd(prompt_tokens: int, cached_tokens: int, completion_tokens: int, price: Price) -> float:
    """(P − C)·p_in + C·p_cached + O·p_out, per 1M tokens."""
    cached = min(cached_tokens or 0, prompt_tokens)
    return ((prompt_tokens - cached) * price.input + cached * price.cached_input
            + completion_tokens * price.output) / 1e6


# Model families whose MLP has no gate (two matrices, h·I each); every other family's MLP is
# gated (three: Llama, Qwen, Mistral, Gemma — Gemma's activation is gelu_pytorch_tanh, so the
# activation's name cannot tell).
NON_GATED = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom",
                       "falcon", "phi", "starcoder2", "codegen", "mpt"})
# GPT-2-family config names of the same quantities.
_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
            "intermediate_size": "n_inner", "num_attention_heads": "n_head"}


def params_from_config(path: str | Path | dict) -> float:
    """Parameter count N of a decoder-only transformer from its Hugging Face `config.json` (a
    folder, the file, or the config as a dict), in either naming (Llama/Qwen's `hidden_size`,
    GPT-2's `n_embd`).

    N = embeddings (+ an untied LM head) (+ learned positions) + L × (attention + MLP + norms):
    attention with grouped KV heads (q, o: h²; k, v: h·kv_dim each), an MLP of 3·h·I (gated)
    or 2·h·I (`NON_GATED` families; GPT-2's I defaults to 4h). Biases are ignored (< 0.1%).
    Where the weights are at hand, `params_from_weights` counts exactly.
    """
    if isinstance(path, dict):
        cfg, path = path, "config"
    else:
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())

    def get(key, default=None):
        for k in (key, _ALIASES.get(key)):
            if k is not None and cfg.get(k) is not None:
                return cfg[k]
        if default is not None:
            return default
        raise InputError(f"{path}: config.json lacks {key!r}"
                         + (f" (or {_ALIASES[key]!r})" if key in _ALIASES else ""))

    h, layers, vocab = get("hidden_size"), get("num_hidden_layers"), get("vocab_size")
    heads = get("num_attention_heads")
    model_type = cfg.get("model_type", "")
    gated = model_type not in NON_GATED
    inter = get("intermediate_size", default=4 * h if not gated else None)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * head_dim * kv_heads
    mlp = (3 if gated else 2) * h * inter
    tied = cfg.get("tie_word_embeddings", model_type in NON_GATED)
    embed = vocab * h * (1 if tied else 2)
    positions = h * cfg["n_positions"] if "n_positions" in cfg else 0  # GPT-2's learned table
    return float(embed + positions + layers * (attn + mlp + 2 * h) + h)


def params_from_weights(folder: str | Path) -> float | None:
    """The exact parameter count of a local model folder: the sizes in its safetensors headers
    (no tensor is read). None without safetensors files."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return float(total)


def model_infos(backends: Sequence[Backend], prices: Sequence[Price] | None = None
                ) -> tuple[trace.ModelInfo, ...]:
    """The trace format's record of each backend: name, N, prices (given, else the backend's
    own `price`, else zero)."""
    if prices is None:
        prices = [getattr(b, "price", Price(0, 0, 0)) for b in backends]
    return tuple(trace.ModelInfo(b.name, float(b.params), p.input, p.cached_input, p.output)
                 for b, p in zip(backends, prices, strict=True))
