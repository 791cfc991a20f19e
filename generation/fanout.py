"""Trace generation as a recipe any process can follow, and fanned out over a Ray cluster.

A `GeneratorSpec` holds what a process needs to build the trace generator itself (backend
specs and their options, the verifier, the generation config): plain, picklable data, so a Ray
worker builds its own engines where its GPUs are (decision 93). `generate` runs one shard in
this process (what `launch.generate` always did); `generate_on_ray` runs every shard as a Ray
task that owns its engines, resumes its own shard folder and reports progress to the driver,
then merges the shards into one trace set exactly as a single process writes it: the same
records, in the problem order, duplicate ids refused. A worker that dies is retried by Ray and
resumes its shard (`tracegen.run` skips what is written; a torn last line is dropped), so
nothing is lost or written twice.

Ray is optional (`pip install 'jaxroute[ray]'`); nothing here imports it unless asked to fan
out. May import: backends, traces, tinylm, registry, main_job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation import main_job
from generation.backends import costs
from generation.registry import make_backend
from generation.traces import answers, tracegen
from generation.traces.datasets import Problem
from generation.traces.verifier import StepVerifier
from jaxroute import durable, trace, traceset
from jaxroute.errors import InputError, quote

SHARDS = "shards"  # the shard folders' parent inside the output folder


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """How to build a `tracegen.TraceGenerator`, as data.

    models: backend specs small → large (`registry.make_backend`); verifier: a backend spec,
    "rule" (the procedural task's rule verifier) or None; params: N per model for FLOPs (None:
    the backend's own); memory: vLLM memory share per model (and the verifier last); options:
    `make_backend` keywords shared by every backend (seed, tensor parallelism, dtype, …).
    `api_key` is kept out of `repr` (it travels to Ray workers inside the task's arguments)."""

    models: tuple[str, ...]
    gen: tracegen.GenConfig = tracegen.GenConfig()
    verifier: str | None = None
    params: tuple[float | None, ...] = ()
    memory: tuple[float, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    api_key: str | None = dataclasses.field(default=None, repr=False)

    def backend(self, spec: str, i: int, cache: Path | None):
        opts = dict(self.options)
        if i < len(self.memory):
            opts["gpu_memory_utilization"] = self.memory[i]
        return make_backend(spec, params=self.params[i] if i < len(self.params) else None,
                            cache=cache, api_key=self.api_key, **opts)

    def build(self, checker: answers.AnswerChecker, cache: Path | None = None
              ) -> tracegen.TraceGenerator:
        """The generator with freshly built backends (`cache`: OpenAI-style responses' SQLite
        file; every process keeps its own, SQLite is not shared across machines)."""
        if len(self.models) < 2:
            raise InputError("models: at least two backends, small → large")
        backends = [self.backend(s, i, cache) for i, s in enumerate(self.models)]
        verifier = (main_job.rule_verifier if self.verifier == "rule" else
                    StepVerifier(self.backend(self.verifier, len(backends), cache))
                    if self.verifier else None)
        prices = [getattr(b, "price", costs.Price(0, 0, 0)) for b in backends]
        return tracegen.TraceGenerator(backends, checker, verifier, self.gen, prices)


def generate(spec: GeneratorSpec, problems: Sequence[Problem], splits: dict[str, str], out: Path,
             provenance: dict, num_shards: int = 1, shard_index: int = 0,
             accept_partial: bool = False, cache: Path | None = None,
             progress: Callable[[int], Any] | None = None) -> tracegen.RunSummary:
    """One shard of the set (all of it by default) in this process, into `out`."""
    with answers.AnswerChecker() as checker:
        gen = spec.build(checker, cache)
        manifest = gen.manifest(provenance)
        return tracegen.run(gen, problems, splits, out, provenance, num_shards, shard_index,
                            lambda recs: trace.spend(manifest, recs),
                            accept_partial=accept_partial, progress=progress)


def shard_folder(out: Path, index: int, num_shards: int) -> Path:
    return Path(out) / SHARDS / f"{index:03d}-of-{num_shards:03d}"


def _shard_task(spec: GeneratorSpec, problems, splits, out: str, provenance: dict,
                num_shards: int, index: int, accept_partial: bool, reporter) -> dict:
    """One shard, in a Ray worker: resume the shard's folder, generate the rest, hand back the
    shard's records (so the driver needs no shared filesystem to merge) and its summary."""
    folder = shard_folder(Path(out), index, num_shards)
    report = (lambda n: reporter.set.remote(index, n)) if reporter is not None else None
    summary = generate(spec, problems, splits, folder, provenance, num_shards, index,
                       accept_partial, cache=folder / "api_cache.sqlite", progress=report)
    manifest, records = traceset.load_trace_set(folder)
    return {"index": index, "records": records, "manifest": manifest.to_json(),
            "written": summary.written, "failed": summary.failed, "reasons": summary.reasons,
            "requests": summary.backends}


class _Progress:
    """Problems done per shard (a Ray actor): a retried shard re-reports its count, so a
    worker that died is never counted twice."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def set(self, shard: int, n: int) -> None:
        self.done[shard] = n

    def total(self) -> int:
        return sum(self.done.values())


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("fanning out needs Ray: pip install 'jaxroute[ray]'") from None
    return ray


def merge_in_order(shards: Sequence[dict], problems: Sequence[Problem], out: Path) -> dict:
    """Write the shards' records (`_shard_task` results) into `out` as one trace set in the
    problem order — the order a single process writes — refusing duplicate ids and a `out`
    that holds another set (`tracegen.same_set`); the manifest's provenance adds the shards'
    run summaries up (`last_run`, returned)."""
    order = {p.problem_id: i for i, p in enumerate(problems)}
    records, seen = [], {}
    for s in shards:
        for r in s["records"]:
            pid = r["problem_id"]
            if pid in seen:
                raise InputError(f"shards {seen[pid]} and {s['index']}: duplicate problem_id "
                                 f"{quote(pid)}")
            if pid not in order:
                raise InputError(f"shard {s['index']}: problem_id {quote(pid)} is not "
                                 "one of this run's problems (a shard folder from another run?)")
            seen[pid] = s["index"]
            records.append(r)
    records.sort(key=lambda r: order[r["problem_id"]])
    first = trace.Manifest.from_json(shards[0]["manifest"], "shard 0")
    for s in shards[1:]:
        m = trace.Manifest.from_json(s["manifest"], f"shard {s['index']}")
        if not tracegen.same_models(m, first):
            raise InputError(f"shard {s['index']}: manifest differs from shard 0's")
    reasons: dict[str, int] = {}
    for s in shards:
        for k, v in s["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    last = {"written": sum(s["written"] for s in shards),
            "failed": sum(len(s["failed"]) for s in shards), "reasons": reasons,
            "requests": [s["requests"] for s in shards], "shards": len(shards)}
    if (Path(out) / trace.MANIFEST).exists():  # rewrite only the same set, never another
        tracegen.same_set(out, first)
    manifest = dataclasses.replace(first, provenance={**first.provenance, "last_run": last})
    traceset.write_trace_set(out, manifest, records)
    return last


def generate_on_ray(spec: GeneratorSpec, problems: Sequence[Problem], splits: dict[str, str],
                    out: Path, provenance: dict, num_shards: int, address: str | None = "local",
                    shard_resources: dict | None = None, max_retries: int = 3,
                    accept_partial: bool = False, poll_s: float = 0.5
                    ) -> tracegen.RunSummary:
    """Every shard as a Ray task (`shard_resources`: its `num_cpus`/`num_gpus`/…; Ray places
    it and sets its visible GPUs), retried up to `max_retries` times if its worker dies, with
    one progress bar for the whole set; then the shards merged into `out` in the problem order.
    `address`: "local" starts a private cluster on this machine, "auto" joins the running one
    (`ray start --head` / `ray start --address=…`), anything else is a cluster's address.
    Re-running the same command resumes every shard."""
    ray = _ray()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False)
    try:
        resources = _placeable(ray, spec, dict(shard_resources or {}))
        with durable.exclusive(out):  # one driver per output folder
            results = _fan_out(ray, spec, problems, splits, out, provenance, num_shards,
                               resources, max_retries, accept_partial, poll_s)
            last = merge_in_order(results, problems, out)
    finally:
        if started:
            ray.shutdown()
    return tracegen.RunSummary(out, written=last["written"],
                               failed=[f for r in results for f in r["failed"]],
                               reasons=last["reasons"],
                               backends=[b for r in results for b in r["requests"]])


def _placeable(ray, spec: GeneratorSpec, resources: dict) -> dict:
    """The shard task's resources, checked against the cluster: `num_gpus` None means the large
    model's tensor-parallel size for vLLM models where the cluster has GPUs, else none (vLLM's
    CPU build); a request no node can meet would wait forever, so it is an error instead."""
    have = ray.cluster_resources()
    if resources.get("num_gpus") is None:
        vllm = any(m.startswith("vllm:") for m in spec.models)
        tp = dict(spec.options).get("tensor_parallel_size", 1)
        resources["num_gpus"] = tp if vllm and have.get("GPU", 0) > 0 else 0
    for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        want = resources.get(key) or 0
        if want > max(n.get("Resources", {}).get(name, 0) for n in ray.nodes() if n["Alive"]):
            raise InputError(f"a shard asks for {want:g} {name}s but no node of the Ray cluster "
                             f"has that many ({have.get(name, 0):g} in all): lower "
                             f"--{key.removeprefix('num_')}_per_shard")
    return resources


def _fan_out(ray, spec, problems, splits, out, provenance, num_shards, resources, max_retries,
             accept_partial, poll_s) -> list[dict]:
    progress = ray.remote(_Progress).options(num_cpus=0).remote()
    task = ray.remote(_shard_task).options(max_retries=max_retries, **resources)
    shared = [ray.put(x) for x in (spec, list(problems), splits)]
    refs = [task.remote(*shared, str(out), provenance, num_shards, i, accept_partial, progress)
            for i in range(num_shards)]
    pending, results = list(refs), {}
    with tqdm(total=len(problems), desc=f"generate ({num_shards} shards on Ray)",
              unit="problem") as bar:
        while pending:
            done, pending = ray.wait(pending, timeout=poll_s)
            for ref in done:
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    # A shard's own error (bad key, unknown model, bad input) is every shard's:
                    # stop them all at once and raise it as the one process would.
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
            bar.n = ray.get(progress.total.remote())
            bar.refresh()
    return [results[r] for r in refs]



# -- what a tree set costs to generate (README, "Scaling past one machine") ----------------------


def tree_tokens(records: Sequence[dict]) -> dict[str, float]:
    """Mean generated tokens per problem of a 2-model trace set, measured: `small` (every
    root's steps), `large` (the large model's continuation from every step), `steps` (root
    0's), the solo solutions' lengths, and `formula_large` = L_large · (S + 1) / 2 per root,
    the large tokens a tree of S equal steps holds (a continuation from step t writes the
    remaining (S − t) / S of a solution) — the formula the paper-scale estimate uses."""
    small = large = steps = formula = solo_s = solo_l = 0.0
    for r in records:
        length = r["solo"][-1]["cost"]["output_tokens"]
        solo_s += r["solo"][0]["cost"]["output_tokens"]
        solo_l += length
        for root in r["roots"]:
            n = len(root["steps"])
            small += sum(s["cost"]["output_tokens"] for s in root["steps"])
            large += sum(b["cost"]["output_tokens"] for s in root["steps"]
                         for b in s.get("branches", {}).values())
            formula += length * (n + 1) / 2
        steps += len(r["roots"][0]["steps"])
    n = max(len(records), 1)
    return {"small": small / n, "large": large / n, "steps": steps / n,
            "small_solution": solo_s / n, "large_solution": solo_l / n,
            "formula_large": formula / n}


# Tokens per solution of the paper's pair (Qwen2.5-Math-1.5B / 7B-Instruct), from the paper's
# Table 1: "1.5B only" and "7B only" FLOPs per query at 2N FLOPs per generated token, with N the
# preset's (1.54e9, 7.62e9).
PAPER_FLOPS = {"gsm8k": (0.973e12, 4.42e12), "math500": (1.82e12, 9.10e12),
               "omnimath": (2.72e12, 13.56e12)}
# Output tokens per second of one GPU serving a 7–8B model with vLLM at high concurrency
# (third-party figures collected at morphllm.com/vllm-benchmarks, 2026): DeepSeek-R1-Distill-
# Qwen-7B (Qwen2 7B, the paper's large model's architecture) on 1× A100 80GB, default config;
# Llama 3.1 8B (BF16) on 1× H100 80GB. The 1.5B model is given the same rate: an upper bound
# on its time.
DECODE_TOKENS_PER_S = {"A100 80GB": 3363.0, "H100 80GB": 12500.0}


def paper_scale_estimate(problems: int, steps: int, dataset: str, roots: int = 1,
                         params: tuple[float, float] = (1.54e9, 7.62e9),
                         measured_ratio: float = 1.0) -> dict[str, float]:
    """Generated tokens and GPU-hours of a tree set of `problems` problems with S = `steps`
    steps per solution: small tokens R·L_s, large tokens R·L_l·(S + 1)/2 (`tree_tokens`),
    scaled by `measured_ratio` (measured large tokens / formula on the embedded trees); L from
    `PAPER_FLOPS`. Prefill is left out (the prefix cache serves the shared prefixes)."""
    l_small, l_large = (f / (2 * n) for f, n in zip(PAPER_FLOPS[dataset], params, strict=True))
    small = problems * roots * l_small
    large = problems * roots * l_large * (steps + 1) / 2 * measured_ratio
    return {"small_tokens": small, "large_tokens": large,
            **{f"gpu_hours {gpu}": (small + large) / rate / 3600
               for gpu, rate in DECODE_TOKENS_PER_S.items()}}
