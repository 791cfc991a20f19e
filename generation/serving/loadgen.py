"""A closed-loop load generator for any OpenAI-compatible chat endpoint (the routing server's
benchmark): `clients` concurrent clients, each sending its requests back to back through the
`openai` SDK's async client, one event loop. Latency is per request, end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from jaxroute.errors import InputError


@dataclasses.dataclass(frozen=True)
class LoadResult:
    clients: int
    requests: int
    errors: int
    wall_s: float
    latencies_s: tuple[float, ...]  # of the successful requests
    flops: float  # summed over successful responses' routing traces (0 when absent)
    escalated: int  # responses whose routing trace escalated
    traces: tuple[dict, ...] = ()  # the successful responses' routing traces (`jaxroute`)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else float("nan")

    def latency(self, q: float) -> float:
        return float(np.quantile(self.latencies_s, q)) if self.latencies_s else float("nan")


def run_load(base_url: str, model: str, questions: Sequence[str], clients: int,
             requests_per_client: int, *, api_key: str = "EMPTY", seed: int = 0,
             timeout_s: float = 600.0) -> LoadResult:
    """Send `clients × requests_per_client` chat requests (client c's j-th asks
    questions[(c·R + j) mod len], seed `seed + c·R + j`); count errors instead of raising."""
    import openai

    if clients < 1 or requests_per_client < 1 or not questions:
        raise InputError("clients ≥ 1, requests_per_client ≥ 1 and some questions are needed")

    async def go() -> LoadResult:
        lat: list[float] = []
        traces: list[dict] = []
        errors = escalated = 0
        flops = 0.0
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                    timeout=timeout_s)

        async def one_client(c: int) -> None:
            nonlocal errors, escalated, flops
            for j in range(requests_per_client):
                k = c * requests_per_client + j
                t0 = time.perf_counter()
                try:
                    r = await client.chat.completions.create(
                        model=model, seed=seed + k,
                        messages=[{"role": "user", "content": questions[k % len(questions)]}])
                except openai.OpenAIError:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)
                tr = (r.model_extra or {}).get("jaxroute") or {}
                traces.append(tr)
                flops += float(tr.get("cost", {}).get("flops", 0.0))
                escalated += tr.get("escalated_at") is not None
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(one_client(c) for c in range(clients)))
        finally:
            await client.close()
        return LoadResult(clients, clients * requests_per_client, errors,
                          time.perf_counter() - t0, tuple(lat), flops, escalated, tuple(traces))

    return asyncio.run(go())
