"""A live comparison of routing rules on the same problems: rows, curves and records.

One routine for every entry point (`launch.route`, the main job's online stage): R_M comes from
the trace trees or from a large-only run on the calibration and test problems; fixed rules (one
model alone, the exported router) run on the test problems; a thresholded family (STEER, RSD,
SpecReason) runs every grid point on the calibration and test problems in one engine
(`GridRule`), its threshold is chosen on the calibration problems by the one calibration rule
of every method (`jaxroute.guarantee.conformal_choice`: coverage ≥ 1 − α, marginal or PAC;
decisions 68, 88), and that point and the whole curve are reported on the test problems. With
coupled samples (decision 87) a live run is paired with the trees' R_M, and
`replay_agreement` checks a router's live run against its replay on the trees. Finished runs can
be kept in a folder (`store`), so an interrupted comparison resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from generation.backends.base import Backend
from generation.live import online
from generation.live.rules import FixedRule, Rule
from generation.traces.answers import AnswerChecker
from generation.traces.datasets import Problem
from jaxroute import evaluate, guarantee, records
from jaxroute.durable import atomic_write_text
from jaxroute.errors import InputError
from jaxroute.trace import PackedTrees


@dataclasses.dataclass(frozen=True)
class LiveMethod:
    """One row of a live comparison.

    `rule` is a fixed rule, or `family` maps a threshold to a rule and `grid` lists the
    thresholds to search on the calibration problems, from the safest (escalates most) to the
    cheapest. `external` fills the table's "Ext. models"
    column (yes: the rule runs a model of its own); `threshold` is shown for a fixed rule.
    """

    name: str
    rule: Rule | None = None
    family: Callable[[float], Rule] | None = None
    grid: Sequence[float] = ()
    external: str = "no"
    threshold: float = math.nan

    def __post_init__(self):
        if (self.rule is None) == (self.family is None):
            raise InputError(f"{self.name}: give exactly one of rule= and family=")
        if self.family is not None and not self.grid:
            raise InputError(f"{self.name}: a thresholded family needs a grid")


class SharedBackend:
    """A backend whose results are remembered per request: the points of a thresholded family's
    grid regenerate the same drafts, scores and large-model steps (every request carries its
    own seed, so a repeated request has the same answer), and a threshold changes only which of
    them are used (decision 76). Each point's records still count every cost it would pay."""

    CHUNK = 512

    def __init__(self, inner: Backend):
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.price = getattr(inner, "price", None)
        self._memo: dict = {}

    def generate(self, requests, *, whole: bool = False, max_tokens: int = 1024):
        # Each distinct request once (grid points in one engine ask many twice), in calls of
        # at most CHUNK rows (bounds the engine's batch memory).
        todo = list(dict.fromkeys(r for r in requests if (r, whole, max_tokens) not in self._memo))
        fresh = {}
        for i in range(0, len(todo), self.CHUNK):
            part = todo[i:i + self.CHUNK]
            fresh.update(zip(part, self.inner.generate(part, whole=whole, max_tokens=max_tokens),
                             strict=True))
        out = []
        for r in requests:
            res = self._memo.get((r, whole, max_tokens)) or fresh[r]
            if res.error is None:  # a failure is not remembered: it is asked again
                self._memo[(r, whole, max_tokens)] = res
            out.append(res)
        return out


class SharedScorer:
    """A step scorer whose scores are remembered per (question, steps) (decision 76)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self._memo: dict = {}

    def score(self, items):
        todo = [it for it in dict.fromkeys(items) if it not in self._memo]
        if todo:
            scores, spent = self.inner.score(todo)
            self._memo.update(zip(todo, zip(scores, spent, strict=True), strict=True))
        got = [self._memo[it] for it in items]
        return [g[0] for g in got], [g[1] for g in got]


class GridRule:
    """Every point of a thresholded family in one engine: problem copy → its point's rule.

    The engine then writes the drafts of all points in one batched call per round (through a
    `SharedBackend`, each distinct request once) instead of one run per point; with coupled
    samples (decision 87) the points share every step until their decisions part. A record is
    what the point's own run would have written."""

    def __init__(self, rules: Sequence[Rule], owner: dict[int, int]):
        self.rules, self.owner = list(rules), owner  # id(problem copy) -> index into rules
        first = self.rules[0]
        if any((r.sticky, r.start_model) != (first.sticky, first.start_model) for r in rules):
            raise InputError("the points of one family must share stickiness and start model")
        self.name, self.sticky, self.start_model = first.name, first.sticky, first.start_model
        self.feature_names = getattr(first, "feature_names", None)

    def decide(self, views):
        out: list = [None] * len(views)
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(self.owner[id(v.problem)], []).append(i)
        for g, idx in groups.items():
            for i, d in zip(idx, self.rules[g].decide([views[i] for i in idx]), strict=True):
                out[i] = d
        return out


@dataclasses.dataclass
class LiveComparison:
    rows: list[dict[str, Any]]  # one table row per method (test problems)
    curves: dict[str, list[dict[str, Any]]]  # whole test curves of the thresholded families
    records: dict[str, list[dict]]  # per method: the records of its reported run
    large_right: dict[str, bool]  # R_M per problem id, as used for coverage


class _Runs:
    """The live runs of one comparison, each kept in `store` (when given) under a key of what it
    depends on — rule, thresholds, problems, config and the caller's fingerprint — so a restart
    reuses finished runs and runs only the rest."""

    def __init__(self, backends, checker, cfg: online.OnlineConfig, store: Path | None,
                 fingerprint: dict | None):
        self.backends, self.checker, self.cfg = backends, checker, cfg
        self.store, self.fingerprint = store, fingerprint

    def stored(self, key: dict, make: Callable[[], Any], bar, n: int):
        """`make()`, or what a finished earlier run with the same key kept in `store`."""
        key = json.loads(json.dumps({**key, "config": dataclasses.asdict(self.cfg),
                                     "fingerprint": self.fingerprint}, default=str))
        path = self.store and Path(self.store) / (hashlib.sha256(json.dumps(
            key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
        if path and path.exists():
            kept = json.loads(path.read_text())
            if kept.get("key") == key:
                bar.update(n)
                return kept["records"]
        recs = make()
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "records": recs}, default=str))
        return recs

    def run(self, problems, rule, bar) -> list[dict]:
        """One rule on `problems`."""
        start = bar.n
        return self.stored(
            {"rule": rule.name, "threshold": getattr(rule, "threshold", None),
             "problems": [p.problem_id for p in problems]},
            lambda: online.run_online(problems, self.backends, rule, self.checker, self.cfg,
                                      lambda n: bar.update(start + n - bar.n)),
            bar, len(problems))

    def run_grid(self, m: LiveMethod, problems, bar) -> list[list[dict]]:
        """Every grid point of `m` on `problems`, in one engine (`GridRule`); records per
        point."""
        rules = [m.family(g) for g in m.grid]
        n, start = len(problems), bar.n

        def make():
            # Its own copy of each problem per point: the engine routes copies independently,
            # and a copy draws the same samples as its original (streams are keyed by id).
            copies = [[dataclasses.replace(p) for p in problems] for _ in rules]
            owner = {id(p): i for i, ps in enumerate(copies) for p in ps}
            shared = [SharedBackend(b) for b in self.backends]
            recs = online.run_online([p for ps in copies for p in ps], shared,
                                     GridRule(rules, owner), self.checker, self.cfg,
                                     lambda k: bar.update(start + k - bar.n))
            return [[{**r, "method": rules[i].name} for r in recs[i * n:(i + 1) * n]]
                    for i in range(len(rules))]

        return self.stored({"rule": [r.name for r in rules],
                            "threshold": [float(g) for g in m.grid],
                            "problems": [p.problem_id for p in problems]}, make, bar,
                           n * len(rules))


def _summary(recs: list[dict], large_right: dict[str, bool], models, cost_model: str,
             seed: int) -> dict[str, Any]:
    """A live run's row. Problems whose record (or whose large-only record, R_M) failed are left
    out and counted: a failed request is never a result (decision 72)."""
    kept = [r for r in recs if records.usable(r) and r["problem_id"] in large_right]
    if not kept:
        raise RuntimeError(f"every one of {len(recs)} live records failed (first status: "
                           f"{recs[0]['status'] if recs else None!r})")
    return {**evaluate.summarize_records(kept, large_right, models, cost_model, seed),
            "failed": len(recs) - len(kept)}


def _cal_errors(grid_runs: list[list[dict]], large_right: dict[str, bool]) -> np.ndarray:
    """`[problems, grid]` miscoverage on the problems every grid point answered usably."""
    ok = set.intersection(*({r["problem_id"] for r in rs if records.usable(r)}
                            for rs in grid_runs)) & set(large_right)
    return np.array([[float(large_right[r["problem_id"]] and not r["correct"])
                      for r in rs if r["problem_id"] in ok] for rs in grid_runs]).T


def compare_live(methods: Sequence[LiveMethod], cal: Sequence[Problem], test: Sequence[Problem],
                 backends: Sequence[Backend], checker: AnswerChecker, cfg: online.OnlineConfig,
                 models: Sequence, cost_model: str, *, alpha: float,
                 large_right: dict[str, bool] | None = None, large_name: str | None = None,
                 seed: int = 0, between: Callable[[], None] | None = None,
                 store: Path | None = None, fingerprint: dict | None = None,
                 delta: float | None = None) -> LiveComparison:
    """Run every method live and summarise it like the offline table.

    Args:
      methods: the rows, in order.
      cal, test: calibration and test problems.
      backends, checker, cfg: what `online.run_online` needs.
      models: `trace.ModelInfo` per backend (prices and parameter counts for the cost unit).
      cost_model: an `accounting.COST_MODELS` unit.
      alpha, delta: the guarantee every thresholded family is calibrated to (δ None:
        marginal; else PAC at δ — `guarantee.conformal_choice`).
      large_right: R_M per problem id (e.g. from the trace trees); None runs the largest model
        alone on cal and test first and adds its test row, named `large_name`.
      seed: bootstrap seed.
      between: called after each method (a long job releases memory there: each method
        compiles its own batch shapes; decision 81).
      store: a folder where every finished run (a method, or one grid point, on one split) is
        kept; a restart with the same `fingerprint` (what the caller's runs depend on: trace
        set, router, engine) reuses them and runs only the rest.
    """
    out = LiveComparison(rows=[], curves={}, records={}, large_right={})
    runs = _Runs(backends, checker, cfg, store, fingerprint)

    def add(name, recs, row, external, threshold):
        out.rows.append({"method": name, "external": external, **row, "threshold": threshold})
        out.records[name] = recs

    if large_right is None:
        name = large_name or f"model {len(backends) - 1} only"
        with tqdm(total=len(cal) + len(test), desc=f"      {name}", unit="problem") as bar:
            rule = FixedRule(name, len(backends) - 1)
            recs_cal, recs_test = runs.run(cal, rule, bar), runs.run(test, rule, bar)
        out.large_right = {r["problem_id"]: r["correct"] for r in recs_cal + recs_test
                           if records.usable(r)}
        add(name, recs_test, _summary(recs_test, out.large_right, models, cost_model, seed), "–",
            math.nan)
    else:
        out.large_right = dict(large_right)
    for m in methods:
        if m.rule is not None:
            with tqdm(total=len(test), desc=f"      {m.name}", unit="problem") as bar:
                recs = runs.run(test, m.rule, bar)
            add(m.name, recs, _summary(recs, out.large_right, models, cost_model, seed),
                m.external, m.threshold)
        else:
            with tqdm(total=len(m.grid) * (len(cal) + len(test)), unit="problem",
                      desc=f"      {m.name} ({len(m.grid)}-point grid, cal + test)") as bar:
                grid_runs = runs.run_grid(m, list(cal) + list(test), bar)
            errors = _cal_errors([r[:len(cal)] for r in grid_runs], out.large_right)
            recs_test = [r[len(cal):] for r in grid_runs]
            idx, feasible = guarantee.conformal_choice(errors, alpha, delta)
            curve = [dict(_summary(r, out.large_right, models, cost_model, seed),
                          threshold=float(g)) for g, r in zip(m.grid, recs_test, strict=True)]
            add(m.name, recs_test[idx], dict(curve[idx], calibration_feasible=feasible),
                m.external, float(m.grid[idx]))
            out.curves[m.name] = curve
        if between is not None:
            between()
    return out


def replay_agreement(live: Sequence[dict], tree_records: Sequence[dict], trees: PackedTrees,
                     router, models: Sequence, cost_model: str) -> dict[str, Any]:
    """Does a live run of an exported router write and pay what its replay on the trace trees
    says (decision 87)? Per problem: the same verdict and the same generation cost (relative
    1e-4). Returns {"problems", "identical", "rate", "disagreements": [{"problem_id", "cause"}]};
    each cause names the first place the two paths part: a model-0 step whose features differ
    from the tree's (a different sample: batch-shape numerics), a decision that differs on
    equal features, or the large model's rest.

    Args:
      live: the router's live records (`online.run_online`), root 0 of each problem.
      tree_records, trees: the trace records and their `trace.pack` (same order).
      router: the exported `jaxroute.export.Router` the live run used.
    """
    index = {r["problem_id"]: i for i, r in enumerate(tree_records)}
    live = [r for r in live if records.usable(r) and r["problem_id"] in index]
    if not live:
        return {"problems": 0, "identical": 0, "rate": float("nan"), "disagreements": []}
    idx = np.array([index[r["problem_id"]] for r in live])
    walk = evaluate.replay_rule(trees, lambda f, m: router.decide(f, m, path="host").model, idx)
    correct, cost = np.asarray(walk.correct), np.asarray(walk.total_cost)
    action, seg = np.asarray(walk.action), np.asarray(walk.seg)
    out = []
    for i, r in enumerate(live):
        live_cost = records.record_cost(r, models, cost_model)
        if r["correct"] == bool(correct[i]) and abs(live_cost - cost[i]) <= 1e-4 * max(
                1.0, abs(live_cost)):
            continue
        drafts = [p for p in r["pieces"] if "features" in p]
        steps = tree_records[idx[i]]["roots"][0]["steps"]
        cause = (f"the large model's rest differs (live {'right' if r['correct'] else 'wrong'}, "
                 f"cost {live_cost:.4g}; replay {'right' if correct[i] else 'wrong'}, cost "
                 f"{cost[i]:.4g})")
        for t, (p, st) in enumerate(zip(drafts, steps, strict=False)):
            gap = float(np.max(np.abs(np.subtract(p["features"], st["features"]))))
            if gap > 1e-4:
                cause = (f"model 0's step {t} differs from the tree's (features max |Δ| = "
                         f"{gap:.3g}: a different sample)")
                break
            offline = int(action[i, t]) if seg[i, t] == 0 else None
            if p["decision"] != offline:
                cause = (f"the decision at step {t} differs on equal features (live "
                         f"{p['decision']}, replay {offline}; escalation probability "
                         f"{p.get('score')} against κ = {router.kappa:.4g})")
                break
        else:
            if len(drafts) != len(steps) and not any(p["decision"] != p["model"]
                                                     for p in drafts):
                cause = f"live wrote {len(drafts)} model-0 steps, the tree {len(steps)}"
        out.append({"problem_id": r["problem_id"], "cause": cause})
    return {"problems": len(live), "identical": len(live) - len(out),
            "rate": (len(live) - len(out)) / len(live), "disagreements": out}
