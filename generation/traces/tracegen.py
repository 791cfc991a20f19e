"""Trace-tree generation: model-0 trajectories, an escalation branch at every step, solo runs,
verifier labels — written in the `jaxroute.trace` format, resumably.

Semantics follow `jaxroute.trace`: the branch at step t hands the prefix y_{<t} to the larger
model (it regenerates step t onwards). A branch to the largest model is one call that writes the
rest of the solution (a leaf); a branch to an intermediate model (K ≥ 3) is generated step by
step with branches of its own. The branch at step 0 of root 0 is the large model from scratch,
so it doubles as the large-only run (R_M).

Work is batched across all problems of a chunk that wait for the same model ("wavefront"), and
finished problems are appended to `trees.jsonl` (whole lines + fsync); a restart skips them, so a
crash loses at most the chunk in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.backends import costs, streams
from generation.backends.base import Backend, StepRequest, StepResult, prefix_text
from generation.backends.costs import model_infos
from generation.traces import features
from generation.traces.answers import AnswerChecker, Verdict
from generation.traces.datasets import Problem
from jaxroute import accounting, durable, trace, traceset
from jaxroute.errors import InputError, quote


@dataclasses.dataclass(frozen=True)
class GenConfig:
    roots: int = 1  # sampled model-0 trajectories per problem
    max_steps: int = 40  # guard: steps per segment
    max_tokens_per_step: int = 1024
    max_tokens_per_solution: int = 4096  # guard: total generated tokens of a segment
    chunk: int = 16  # problems generated together (and appended together)
    seed: int = 0


@dataclasses.dataclass
class _Segment:
    problem: Problem
    model: int
    prefix: list[str]  # accepted steps before this segment
    prefix_ids: list[int] | None
    start: int
    path: str
    idx: int = 0  # position in the generator's segment list
    root: int = 0  # model 0's sample stream (roots > 0 of model 0 draw their own)
    results: list[StepResult] = dataclasses.field(default_factory=list)
    wasted: dict[int, list[StepResult]] = dataclasses.field(default_factory=dict)  # empty tries
    status: str = "ok"
    done: bool = False




def _key(*parts) -> str:
    return "/".join(str(p) for p in parts)


def seed_for(key: str, base: int) -> int:
    """A sampling seed from a stable key and the run's base seed."""
    return (int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) + base) % (2**31)


# Recorded in every trace set: a set drawn another way is not resumed into (decision 87).
SAMPLING = "one stream per (problem, model), tokens keyed by position (decision 87)"


def stream_seed(problem_id: str, model: int, base: int, *, root: int = 0, attempt: int = 0
                ) -> int:
    """The seed of model `model`'s sample stream on a problem — the one coupling rule of trace
    generation and live routing (decision 87).

    It depends on the problem, the model, the root (model 0's j-th sampled trajectory; every
    other model and root 0 share stream 0) and the empty-step retry (a retry must draw anew),
    never on the path or the round that led there. An engine that keys each token's randomness
    by (seed, absolute position) — the built-in JAX engine — therefore writes the same tokens
    for the same prefix whether it is asked for one step or for the rest; an engine with a
    per-request generator (vLLM, OpenAI-compatible servers) writes the same tokens for the same
    request (same prefix, same mode)."""
    root_part = f"/r{root}" if root else ""
    return seed_for(f"{problem_id}/m{model}{root_part}" + "/retry" * attempt, base)


_cost = costs.generation_cost


@dataclasses.dataclass
class _Tree:
    """The segments of a chunk's trees and the leaves they need."""

    segments: list[_Segment]
    children: dict[int, dict[tuple[int, int], _Segment]] = dataclasses.field(default_factory=dict)
    leaf_jobs: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (seg, t, k)
    leaf_prefixes: list[tuple[Problem, list[str], str]] = dataclasses.field(
        default_factory=list)  # (problem, prefix steps, path) of each leaf job


@dataclasses.dataclass
class _Checks:
    seg: list[Verdict]  # per segment: the verdict of its own answer
    leaf: dict[tuple[int, int], tuple[StepResult, Verdict]]  # (segment, step) → leaf, verdict
    mid: list[Verdict]  # verdicts of the intermediate models' solo runs, problem-major
    labels: dict[tuple[int, int], bool | None]  # verifier label per (segment, step)


def _status(verdict: Verdict, error: str | None = None, status: str = "ok") -> dict:
    """The "status" field of a piece: a failed request or a check without a verdict (timed
    out, failed) is an error, which makes the problem unusable (decisions 72, 73)."""
    if error is not None:
        return {"status": f"error: {error}"}
    if not verdict.usable:
        return {"status": f"error: answer check {verdict}"}
    return {} if status == "ok" else {"status": status}


class TraceGenerator:
    """Generates trace trees for problems with `backends` ordered small → large.

    Args:
      backends: K ≥ 2 backends.
      checker: answer checker (math-verify in worker processes).
      verifier: optional `(question, prefix_steps, step) -> bool | None` step verifier.
      config: guards and sampling.
      prices: per-backend `costs.Price` for the manifest (USD accounting at pack time).
    """

    def __init__(self, backends: Sequence[Backend], checker: AnswerChecker,
                 verifier: Callable[[list[tuple[str, list[str], str]]], list[bool | None]] | None,
                 config: GenConfig = GenConfig(), prices: Sequence[costs.Price] | None = None):
        if len(backends) < 2:
            raise InputError("trace generation needs at least two models")
        self.backends, self.checker, self.verifier, self.cfg = list(backends), checker, verifier, config
        self.prices = list(prices) if prices else [costs.Price(0, 0, 0)] * len(backends)

    def manifest(self, provenance: dict) -> trace.Manifest:
        # Weights versions (where a backend knows them) make stale trace sets detectable.
        versions = [getattr(b, "version", None) for b in self.backends]
        return trace.Manifest(
            models=model_infos(self.backends, self.prices),
            feature_names=features.FEATURE_NAMES,
            provenance={**provenance, "model_versions": versions, "sampling": SAMPLING})

    # -- generation ------------------------------------------------------------------------------

    def _expand(self, segments: list[_Segment]) -> None:
        """Generate every segment: as one streaming request cut into steps where the model's
        backend streams (the live engine's path, decision 94), else step by step, batching per
        model across segments."""
        cfg = self.cfg
        self._stream_segments([s for s in segments if not s.done and
                               streams.is_streaming(self.backends[s.model])])
        while True:
            live = [s for s in segments if not s.done]
            if not live:
                return
            for k in sorted({s.model for s in live}):
                group = [s for s in live if s.model == k]
                reqs = []
                for s in group:
                    steps = s.prefix + [r.text for r in s.results]
                    ids = None
                    if s.prefix_ids is not None:
                        ids = tuple(s.prefix_ids + [i for r in s.results for i in r.token_ids])
                    tries = len(s.wasted.get(len(s.results), []))
                    key = _key(s.problem.problem_id, s.path, len(s.results))
                    # A retried empty step asks again with a new seed (the nudge, decision 75).
                    reqs.append(StepRequest(key, s.problem.question, tuple(steps), ids,
                                            stream_seed(s.problem.problem_id, s.model, cfg.seed,
                                                        root=s.root, attempt=tries)))
                outs = self.backends[k].generate(reqs, max_tokens=cfg.max_tokens_per_step)
                for s, r in zip(group, outs, strict=True):
                    if r.error is not None:
                        s.status, s.done = f"error: {r.error}", True
                        continue
                    if not r.text.strip() and not r.is_final:
                        wasted = s.wasted.setdefault(len(s.results), [])
                        wasted.append(r)  # paid for: its cost joins the step's
                        if len(wasted) > streams.EMPTY_RETRIES:
                            s.status, s.done = "empty_step", True
                        continue
                    s.results.append(r)
                    total = sum(x.completion_tokens for x in s.results)
                    if r.is_final:
                        s.done = True
                    elif len(s.results) >= cfg.max_steps:
                        s.status, s.done = "max_steps", True
                    elif total >= cfg.max_tokens_per_solution:
                        s.status, s.done = "max_tokens", True

    def _stream_segments(self, segments: list[_Segment]) -> None:
        """Each segment's answer as one request of its model, read to the end and cut into
        steps exactly as a live answer stream cuts it (`streams.read_all`)."""
        if not segments:
            return
        cfg = self.cfg

        def answer(s: _Segment) -> streams.AnswerStream:
            req = StepRequest(_key(s.problem.problem_id, s.path), s.problem.question,
                              tuple(s.prefix), None if s.prefix_ids is None
                              else tuple(s.prefix_ids),
                              stream_seed(s.problem.problem_id, s.model, cfg.seed, root=s.root))
            return streams.open_answer(self.backends[s.model], None, streams.Answer(
                req, (), cfg.max_tokens_per_solution, cfg.max_tokens_per_step))

        async def run():
            try:
                return await asyncio.gather(*(streams.read_all(answer(s), cfg.max_steps,
                                                               cfg.max_tokens_per_solution)
                                              for s in segments))
            finally:
                await streams.close_clients(self.backends)

        for s, (steps, status) in zip(segments, asyncio.run(run()), strict=True):
            s.results = [r for r in steps if r.error is None and not streams.is_empty(r)]
            s.status, s.done = status, True

    def _leaves(self, jobs: list[tuple[Problem, list[str], str]]) -> list[StepResult]:
        """The largest model writes the rest of each solution (one call each, batched)."""
        last = len(self.backends) - 1
        reqs = [StepRequest(_key(p.problem_id, path, "leaf"), p.question, tuple(prefix), None,
                            stream_seed(p.problem_id, last, self.cfg.seed))
                for p, prefix, path in jobs]
        return self.backends[-1].generate(reqs, whole=True,
                                          max_tokens=self.cfg.max_tokens_per_solution)

    def generate(self, problems: Sequence[Problem], splits: dict[str, str]) -> list[dict]:
        """Trace-tree records for `problems` (see `jaxroute.trace` for the format), in five
        phases: the segments of every tree, the leaves, the intermediate models' solo runs,
        answer checks and verifier labels, and the records."""
        tree = self._segments(problems)
        leaf_results = self._leaves(tree.leaf_prefixes) if tree.leaf_prefixes else []
        mid_solo = self._mid_solo(problems)
        checks = self._checks(problems, tree, leaf_results, mid_solo)
        return [self._record(i, p, splits[p.problem_id], tree, mid_solo, checks)
                for i, p in enumerate(problems)]

    def _segments(self, problems: Sequence[Problem]) -> _Tree:
        """Every segment of every problem's tree (roots, then branches to intermediate models,
        breadth first), generated step by step, and the leaf jobs they spawn."""
        k_models = len(self.backends)
        roots = [_Segment(p, 0, [], [], 0, f"r{j}", idx=i * self.cfg.roots + j, root=j)
                 for i, p in enumerate(problems) for j in range(self.cfg.roots)]
        tree = _Tree(segments=list(roots))
        frontier = list(roots)
        while frontier:
            self._expand(frontier)
            nxt = []
            for seg in frontier:
                for t in range(len(seg.results)):
                    prefix = seg.prefix + [r.text for r in seg.results[:t]]
                    for kp in range(seg.model + 1, k_models):
                        if kp == k_models - 1:
                            tree.leaf_jobs.append((seg.idx, t, kp))
                            tree.leaf_prefixes.append(
                                (seg.problem, prefix, f"{seg.path}.{t}>{kp}"))
                        else:
                            child = _Segment(seg.problem, kp, prefix, None, seg.start + t,
                                             f"{seg.path}.{t}>{kp}", idx=len(tree.segments))
                            tree.children.setdefault(seg.idx, {})[(t, kp)] = child
                            tree.segments.append(child)
                            nxt.append(child)
            frontier = nxt
        return tree

    def _mid_solo(self, problems: Sequence[Problem]) -> dict[tuple[str, int], StepResult]:
        """Intermediate models alone from scratch (model 0's solo run is root 0, the largest
        model's is root 0's branch at step 0)."""
        out = {}
        for k in range(1, len(self.backends) - 1):
            reqs = [StepRequest(_key(p.problem_id, f"solo{k}"), p.question, (), None,
                                stream_seed(p.problem_id, k, self.cfg.seed))
                    for p in problems]
            for p, r in zip(problems, self.backends[k].generate(
                    reqs, whole=True, max_tokens=self.cfg.max_tokens_per_solution), strict=True):
                out[(p.problem_id, k)] = r
        return out

    def _checks(self, problems, tree: _Tree, leaf_results, mid_solo) -> _Checks:
        """Answer checks of segments, leaves and solo runs, all at once; verifier labels of
        every generated step."""
        k_models = len(self.backends)
        seg_items = [(prefix_text(seg.prefix + [r.text for r in seg.results]), seg.problem.gold,
                      seg.problem.dataset) for seg in tree.segments]
        leaf_items = [(prefix_text(prefix) + r.text, p.gold, p.dataset)
                      for (p, prefix, _), r in zip(tree.leaf_prefixes, leaf_results, strict=True)]
        mid_items = [(mid_solo[(p.problem_id, k)].text, p.gold, p.dataset)
                     for p in problems for k in range(1, k_models - 1)]
        verdicts = self.checker.check_many(seg_items + leaf_items + mid_items)
        n_seg, n_leaf = len(seg_items), len(leaf_items)
        ver_items, ver_index = [], []
        if self.verifier is not None:
            for si, seg in enumerate(tree.segments):
                for t, r in enumerate(seg.results):
                    ver_items.append((seg.problem.question,
                                      seg.prefix + [x.text for x in seg.results[:t]], r.text))
                    ver_index.append((si, t))
        labels = dict(zip(ver_index, self.verifier(ver_items), strict=True)) if ver_items else {}
        return _Checks(seg=verdicts[:n_seg],
                       leaf={(si, t): (r, v) for (si, t, _), r, v in
                             zip(tree.leaf_jobs, leaf_results, verdicts[n_seg:n_seg + n_leaf],
                                 strict=True)},
                       mid=verdicts[n_seg + n_leaf:], labels=labels)

    def _segment_record(self, si: int, tree: _Tree, checks: _Checks) -> dict:
        k_models = len(self.backends)
        seg = tree.segments[si]
        backend = self.backends[seg.model]
        state = features.MathSpanState()
        for s in seg.prefix:
            state.feed(s)
        steps = []
        for t, r in enumerate(seg.results):
            conf, _ = features.step_confidence(r.tokens, r.confidence, r.confidence_kind,
                                               features.MathSpanState(**vars(state)))
            vector, state = features.step_vector(features.FEATURE_NAMES, r, seg.start + t,
                                                 seg.problem.difficulty, state)
            branches = {}
            for kp in range(seg.model + 1, k_models):
                if kp == k_models - 1:
                    lr, v = checks.leaf[(si, t)]
                    branches[str(kp)] = {"model": kp, "correct": v == Verdict.CORRECT,
                                         "cost": _cost(lr, self.backends[kp].params),
                                         **_status(v, lr.error)}
                else:
                    branches[str(kp)] = self._segment_record(tree.children[si][(t, kp)].idx,
                                                             tree, checks)
            steps.append({
                "features": vector,
                "cost": _sum([_cost(x, backend.params)
                              for x in [*seg.wasted.get(t, []), r]]),
                "verifier_ok": checks.labels.get((si, t)),
                "branches": branches,
                "math_tokens": conf.math_tokens,
                "confidence_all": conf.all_tokens,  # over every token, beside the maths-only S
            })
        st = _status(checks.seg[si], None, seg.status).get("status", "ok")
        return {"model": seg.model, "correct": checks.seg[si] == Verdict.CORRECT, "status": st,
                "steps": steps}

    def _record(self, i: int, p: Problem, split: str, tree: _Tree, mid_solo,
                checks: _Checks) -> dict:
        """Problem i's record: its roots' trees and the solo runs."""
        k_models = len(self.backends)
        root_ids = [i * self.cfg.roots + j for j in range(self.cfg.roots)]
        r0 = tree.segments[root_ids[0]]
        solo = [{"correct": checks.seg[root_ids[0]] == Verdict.CORRECT,
                 "cost": _sum([_cost(r, self.backends[0].params) for r in r0.results])}]
        for k in range(1, k_models - 1):
            r = mid_solo[(p.problem_id, k)]
            v = checks.mid[i * (k_models - 2) + k - 1]
            solo.append({"correct": v == Verdict.CORRECT,
                         "cost": _cost(r, self.backends[k].params), **_status(v, r.error)})
        if r0.results:
            lr, v = checks.leaf[(root_ids[0], 0)]
        else:  # the root failed before its first step: run the large model on its own
            lr = self._leaves([(p, [], "solo")])[0]
            v = self.checker.check(lr.text, p.gold, p.dataset)
        solo.append({"correct": v == Verdict.CORRECT, "cost": _cost(lr, self.backends[-1].params),
                     **_status(v, lr.error)})
        return {"problem_id": p.problem_id, "dataset": p.dataset, "difficulty": p.difficulty,
                "split": split, "solo": solo,
                "roots": [self._segment_record(si, tree, checks) for si in root_ids]}


# -- resumable driver, shards, merge -------------------------------------------------------------


def shard_of(problem_id: str, num_shards: int) -> int:
    return int(hashlib.sha256(problem_id.encode()).hexdigest()[:8], 16) % num_shards


@dataclasses.dataclass
class RunSummary:
    """What a `run` did: problems written, and those that failed (not written unless partial
    sets are accepted; a re-run retries them) with their reasons."""

    out: Path
    written: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # problem ids
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    backends: list[dict] = dataclasses.field(default_factory=list)  # per backend `summary()`

    def line(self) -> str:
        text = f"{self.written} problems written to {self.out}"
        if self.failed:
            why = ", ".join(f"{k}: {v}" for k, v in self.reasons.items())
            text += f"; {len(self.failed)} failed ({why})"
        return text


def _reason(status: str) -> str:
    """"error: request p/r0/1: RuntimeError: gave up …" → "RuntimeError" (a short reason)."""
    text = re.sub(r"^request \S+: ", "", status.removeprefix("error: "))
    return text.split(":")[0].strip()[:60] or "error"


def run(gen: TraceGenerator, problems: Sequence[Problem], splits: dict[str, str], out: Path,
        provenance: dict, num_shards: int = 1, shard_index: int = 0,
        spend: Callable[[list[dict]], dict[str, float]] | None = None,
        accept_partial: bool = False, progress: Callable[[int], Any] | None = None
        ) -> RunSummary:
    """Generate into `out` (a trace-set folder), skipping problems already written there.

    A problem with a failed request anywhere in its tree (decision 72) is never a result: it is
    not written — a re-run retries it — unless `accept_partial`, which writes it marked
    unusable (`trace.problem_errors`; packing excludes it). The summary (counts, reasons, the
    backends' request statistics) is returned and recorded in the manifest's provenance.
    `progress(n)`: called with the shard's problems done so far (those found written first,
    then after every chunk) instead of drawing a progress bar — a driver fanning shards out
    (`generation.fanout`) draws one bar for the whole set."""
    if not 0 <= shard_index < num_shards:
        raise InputError(f"shard_index {shard_index} not in [0, {num_shards})")
    with durable.exclusive(out):  # one writer per folder (decision 78)
        return _run(gen, problems, splits, Path(out), provenance, num_shards, shard_index, spend,
                    accept_partial, progress)


# Provenance fields a resume may change without changing what the trace set is.
_RESUMABLE = ("last_run", "model_versions", "chunk")


def _same_run(old: dict, new: dict) -> list[str]:
    """The differences between two provenances that make them different trace sets."""
    def strip(d):
        d = {k: v for k, v in d.items() if k not in _RESUMABLE}
        if isinstance(d.get("config"), dict):
            d["config"] = {k: v for k, v in d["config"].items() if k not in _RESUMABLE}
        return d

    a, b = strip(old), strip(new)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def same_set(out: Path, manifest: trace.Manifest) -> trace.Manifest:
    """The trace set already in `out`, if it is the set `manifest` describes (same models,
    weights, features and settings: a run may resume or rewrite it); else an error — a run
    never overwrites or extends another set."""
    mpath = Path(out) / trace.MANIFEST
    old = traceset.read_manifest(out)
    if [m.name for m in old.models] != [m.name for m in manifest.models] or \
            old.feature_names != manifest.feature_names or \
            old.provenance.get("model_versions") != manifest.provenance.get("model_versions"):
        raise InputError(f"{mpath}: existing trace set was made with other models, weights or "
                         "features; use a new --out folder")
    diffs = _same_run(old.provenance, manifest.provenance)
    if diffs:
        raise FileExistsError(f"{mpath}: existing trace set was made with other settings "
                              f"({'; '.join(diffs[:5])}); use a new --out folder")
    return old


def _run(gen, problems, splits, out: Path, provenance, num_shards, shard_index, spend,
         accept_partial, progress=None) -> RunSummary:
    manifest = gen.manifest(provenance)
    mpath = out / trace.MANIFEST
    if mpath.exists():
        manifest = same_set(out, manifest)
    else:
        durable.atomic_write_text(mpath, json.dumps(manifest.to_json(), indent=2) + "\n")
    tpath = out / trace.TREES
    tpath.touch()
    dropped = durable.repair_tail(tpath)
    done = {rec["problem_id"] for _, rec in traceset.read_records(tpath)}
    todo = [p for p in problems if shard_of(p.problem_id, num_shards) == shard_index
            and p.problem_id not in done]
    summary = RunSummary(out)
    bar = tqdm(total=len(todo), desc=f"generate (shard {shard_index}/{num_shards})",
               unit="problem", disable=progress is not None)
    finished = len(done)  # this shard's problems done, for `progress`
    if progress is not None:
        progress(finished)
    if dropped:
        bar.write(f"dropped a torn last line ({dropped} bytes) left by an interrupted run")
    totals: dict[str, float] = {}
    try:
        for i in range(0, len(todo), gen.cfg.chunk):
            chunk = todo[i:i + gen.cfg.chunk]
            records, keep = gen.generate(chunk, splits), []
            for r in records:
                trace.validate_problem(r, manifest, where=f"{tpath}: generated")
                errors = trace.problem_errors(r)
                if errors:
                    summary.failed.append(r["problem_id"])
                    for e in errors:
                        reason = _reason(e)
                        summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
                    if not accept_partial:
                        continue
                keep.append(r)
            durable.append_records(tpath, keep)
            summary.written += len(keep)
            if spend is not None and records:
                for k, v in spend(records).items():
                    totals[k] = totals.get(k, 0.0) + v
                bar.set_postfix({**{k: f"{v:.4g}" for k, v in totals.items()},
                                 "failed": len(summary.failed)})
            bar.update(len(chunk))
            finished += len(chunk)
            if progress is not None:
                progress(finished)
    finally:
        bar.close()
        summary.backends = [b.summary() for b in gen.backends if hasattr(b, "summary")]
        manifest = dataclasses.replace(manifest, provenance={
            **manifest.provenance, "last_run": {"written": summary.written,
                                                "failed": len(summary.failed),
                                                "reasons": summary.reasons,
                                                "requests": summary.backends}})
        durable.atomic_write_text(mpath, json.dumps(manifest.to_json(), indent=2) + "\n")
    return summary


def same_models(a: trace.Manifest, b: trace.Manifest) -> bool:
    """Whether two shards' manifests describe one set's models and features (mergeable)."""
    return a.to_json()["models"] == b.to_json()["models"] and a.feature_names == b.feature_names


def merge(parts: Sequence[Path], out: Path) -> Path:
    """Merge shard folders (same manifest) into one trace set; duplicate ids are an error."""
    parts = [Path(p) for p in parts]
    manifests = [traceset.read_manifest(p) for p in parts]
    first = manifests[0]
    for p, m in zip(parts, manifests, strict=True):
        if not same_models(m, first):
            raise InputError(f"{p}: manifest differs from {parts[0]}")
    records, seen = [], set()
    for p in parts:
        for n, rec in traceset.read_records(p / trace.TREES):
            if rec["problem_id"] in seen:
                raise InputError(f"{p / trace.TREES}: line {n}: duplicate problem_id "
                                 f"{quote(rec['problem_id'])}")
            seen.add(rec["problem_id"])
            records.append(rec)
    traceset.write_trace_set(out, first, records)
    return Path(out)


def _sum(costs) -> dict:
    """A generated segment's cost: its pieces' costs added up, prefill FLOPs included."""
    return accounting.sum_costs(costs, accounting.COST_FIELDS + ("prefill_flops",))
