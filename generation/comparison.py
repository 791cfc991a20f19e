"""A live comparison of routing rules on the same problems: rows, curves and records.

One routine for every entry point (`launch.route`, the main job's online stage): R_M comes from
the trace trees or from a large-only run on the calibration and test problems; fixed rules (one
model alone, the exported router) run on the test problems; a thresholded family (STEER, RSD,
SpecReason) runs over its grid on the calibration problems, its threshold is chosen there by
the one calibration rule of every method (`jaxroute.evaluate.conformal_choice`: coverage
≥ 1 − α, decision 68), and that point and the whole curve are reported on the test problems.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from generation import online
from generation.answers import AnswerChecker
from generation.backend import Backend
from generation.datasets import Problem
from generation.rules import FixedRule, Rule
from jaxroute import evaluate, records
from jaxroute.errors import InputError


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

    def __init__(self, inner: Backend):
        self.inner, self.name, self.params = inner, inner.name, inner.params
        self.price = getattr(inner, "price", None)
        self._memo: dict = {}

    def generate(self, requests, *, whole: bool = False, max_tokens: int = 1024):
        todo = [r for r in requests if (r, whole, max_tokens) not in self._memo]
        fresh = dict(zip(todo, self.inner.generate(todo, whole=whole, max_tokens=max_tokens),
                         strict=True)) if todo else {}
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


@dataclasses.dataclass
class LiveComparison:
    rows: list[dict[str, Any]]  # one table row per method (test problems)
    curves: dict[str, list[dict[str, Any]]]  # whole test curves of the thresholded families
    records: dict[str, list[dict]]  # per method: the records of its reported run
    large_right: dict[str, bool]  # R_M per problem id, as used for coverage


def compare_live(methods: Sequence[LiveMethod], cal: Sequence[Problem], test: Sequence[Problem],
                 backends: Sequence[Backend], checker: AnswerChecker, cfg: online.OnlineConfig,
                 models: Sequence, cost_model: str, *, alpha: float,
                 large_right: dict[str, bool] | None = None, large_name: str | None = None,
                 seed: int = 0, between: Callable[[], None] | None = None) -> LiveComparison:
    """Run every method live and summarise it like the offline table.

    Args:
      methods: the rows, in order.
      cal, test: calibration and test problems.
      backends, checker, cfg: what `online.run_online` needs.
      models: `trace.ModelInfo` per backend (prices and parameter counts for the cost unit).
      cost_model: a `trace.COST_MODELS` unit.
      alpha: the guarantee every thresholded family is calibrated to.
      large_right: R_M per problem id (e.g. from the trace trees); None runs the largest model
        alone on cal and test first and adds its test row, named `large_name`.
      seed: bootstrap seed.
      between: called after each method (a long job releases memory there: each method
        compiles its own batch shapes; decision 81).
    """
    out = LiveComparison(rows=[], curves={}, records={}, large_right={})
    k = len(backends)

    def run(problems, rule, bar, via=backends):
        start = bar.n
        return online.run_online(problems, via, rule, checker, cfg,
                                 lambda n: bar.update(start + n - bar.n))

    def summarize(recs):
        # Problems whose record (or whose large-only record, R_M) failed are left out and
        # counted: a failed request is never a result (decision 72).
        kept = [r for r in recs if records.usable(r) and r["problem_id"] in out.large_right]
        if not kept:
            raise RuntimeError(f"every one of {len(recs)} live records failed (first status: "
                               f"{recs[0]['status'] if recs else None!r})")
        return {**evaluate.summarize_records(kept, out.large_right, models, cost_model, seed),
                "failed": len(recs) - len(kept)}

    def cal_errors(grid_runs):
        """[problems, grid] errors on problems every grid point answered usably."""
        ok = set.intersection(*({r["problem_id"] for r in rs if records.usable(r)}
                                for rs in grid_runs)) & set(out.large_right)
        return np.array([[float(out.large_right[r["problem_id"]] and not r["correct"])
                          for r in rs if r["problem_id"] in ok] for rs in grid_runs]).T

    def add(name, recs, row, external, threshold):
        out.rows.append({"method": name, "external": external, **row, "threshold": threshold})
        out.records[name] = recs

    if large_right is None:
        name = large_name or f"model {k - 1} only"
        with tqdm(total=len(cal) + len(test), desc=f"      {name}", unit="problem") as bar:
            rule = FixedRule(name, k - 1)
            recs_cal, recs_test = run(cal, rule, bar), run(test, rule, bar)
        out.large_right = {r["problem_id"]: r["correct"] for r in recs_cal + recs_test
                           if records.usable(r)}
        add(name, recs_test, summarize(recs_test), "–", math.nan)
    else:
        out.large_right = dict(large_right)
    for m in methods:
        if m.rule is not None:
            with tqdm(total=len(test), desc=f"      {m.name}", unit="problem") as bar:
                recs = run(test, m.rule, bar)
            add(m.name, recs, summarize(recs), m.external, m.threshold)
        else:
            shared = [SharedBackend(b) for b in backends]  # one family's grid shares its work
            with tqdm(total=len(m.grid) * (len(cal) + len(test)), unit="problem",
                      desc=f"      {m.name} ({len(m.grid)}-point grid, cal + test)") as bar:
                errors = cal_errors([run(cal, m.family(g), bar, shared) for g in m.grid])
                recs_test = [run(test, m.family(g), bar, shared) for g in m.grid]
            idx, feasible = evaluate.conformal_choice(errors, alpha)
            curve = [dict(summarize(r), threshold=float(g))
                     for g, r in zip(m.grid, recs_test, strict=True)]
            add(m.name, recs_test[idx], dict(curve[idx], calibration_feasible=feasible),
                m.external, float(m.grid[idx]))
            out.curves[m.name] = curve
        if between is not None:
            between()
    return out
