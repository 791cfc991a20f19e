"""Cost accounting: the cost models (units) and how recorded costs add up and become one scalar.

A cost record is `{"flops", "input_tokens", "cached_input_tokens", "output_tokens"}` (the trace
format's `Cost`, a live record's piece). Every layer adds them up with `sum_costs` and turns one
into the chosen unit with `cost_of`: FLOPs in 1e12 ("flops") or 1e6 ("mflops", the embedded tiny
models), or US cents at a model's prices ("usd_cents").
"""

from __future__ import annotations

from collections.abc import Sequence

COST_MODELS = ("flops", "mflops", "usd_cents")
FLOP_UNITS = {"flops": 1e12, "mflops": 1e6}  # FLOPs per unit of each FLOPs cost model
COST_FIELDS = ("flops", "input_tokens", "cached_input_tokens", "output_tokens")



def sum_costs(costs, keys: Sequence[str] = COST_FIELDS) -> dict:
    """Field-wise sum of cost records; `keys` (by default every cost record's fields) are
    present, 0, even when no record has them. The one way every layer adds costs up."""
    out: dict = {k: 0.0 if k.endswith("flops") else 0 for k in keys}
    for c in costs:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out



def cost_of(c: dict, model, cost_model: str) -> float:
    """One scalar cost: FLOPs in units of 1e12 ("flops") or 1e6 ("mflops"), or US cents from
    token counts and the model's prices ("usd_cents"; `model` has `price_input`,
    `price_cached_input`, `price_output` in USD per 1M tokens, e.g. a `trace.ModelInfo`)."""
    if cost_model in FLOP_UNITS:  # "mflops": the embedded tiny models' steps cost ~1e6 FLOPs
        return c["flops"] / FLOP_UNITS[cost_model]
    if cost_model == "usd_cents":
        fresh = c["input_tokens"] - c["cached_input_tokens"]
        usd = (fresh * model.price_input + c["cached_input_tokens"] * model.price_cached_input
               + c["output_tokens"] * model.price_output) / 1e6
        return 100.0 * usd
    raise ValueError(f"cost_model must be one of {COST_MODELS}, got {cost_model!r}")
