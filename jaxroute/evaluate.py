"""Evaluation: the trained router (eq. 6) against baselines and the oracle, offline and live.

Offline, every method is a per-node action array replayed by `env.walk` on the test split's
instances (problem × sampled root), so all are scored on the same generations. Live runs
(`jaxroute.records`) become the same `Outcome` (`records_outcome`) and the same summary. Either
way a thresholded method is run over its grid on the calibration split, one point is chosen
there, and that point (and the whole curve) is reported on the test split: `choose_point` is the
one routine for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxroute import baselines, env, records
from jaxroute.trace import PackedTrees


@dataclasses.dataclass
class Outcome:
    """Per-instance results of one method on a set of instances."""

    correct: np.ndarray  # [N] bool
    cost: np.ndarray  # [N] float
    escalation: np.ndarray  # [N] int decision index of the first escalation, −1 if none
    large_right: np.ndarray  # [N] bool R_M = 1
    problems: np.ndarray  # [N] problem index (for bootstrap by problem)


def walk_outcome(trees: PackedTrees, dev: PackedTrees, problems: np.ndarray, roots: np.ndarray,
                 node_action: np.ndarray) -> Outcome:
    """Replay per-node actions `[N, S, T]` (already gathered per instance)."""
    w = env.walk(dev, jnp.asarray(problems), jnp.asarray(roots), jnp.asarray(node_action),
                 env.horizon(trees))
    return Outcome(correct=np.asarray(w.correct), cost=np.asarray(w.total_cost),
                   escalation=np.asarray(w.escalation),
                   large_right=trees.solo_correct[problems, -1], problems=problems)


def solo_outcome(trees: PackedTrees, problems: np.ndarray, model: int) -> Outcome:
    return Outcome(correct=trees.solo_correct[problems, model],
                   cost=trees.solo_cost[problems, model],
                   escalation=np.full(len(problems), -1 if model == 0 else 0),
                   large_right=trees.solo_correct[problems, -1], problems=problems)


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, seed: int = 0, reps: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of `values`, resampling whole problems (`groups`)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values.astype(float))
    counts = np.bincount(inv)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), (reps, len(uniq)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / n₊n₋);
    nan when a class is empty. `scores`, `labels` `[N]`."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, cnt = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]  # average 1-based rank over ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(o: Outcome, seed: int = 0) -> dict[str, Any]:
    covered = o.correct | ~o.large_right
    acc = float(o.correct.mean())
    cost = float(o.cost.mean())
    esc = o.escalation >= 0
    lo, hi = bootstrap_ci(covered, o.problems, seed)
    return {
        "accuracy": 100.0 * acc,
        "cost": cost,
        "acc_per_cost": 100.0 * acc / cost if cost > 0 else float("inf"),
        "coverage": float(covered.mean()),
        "coverage_ci": [lo, hi],
        "escalation_rate": float(esc.mean()),
        "mean_escalation_step": float(o.escalation[esc].mean()) if esc.any() else float("nan"),
        "instances": int(len(o.correct)),
    }


def oracle_summary(trees: PackedTrees, problems: np.ndarray, roots: np.ndarray,
                   alpha: float) -> dict[str, dict[str, Any]]:
    """The two oracles on the given instances.

    - "oracle (max accuracy)": the cheapest correct path where one exists, else the cheapest path.
    - "oracle (coverage 1−α)": the cheapest per-instance choice meeting coverage ≥ 1 − α: start from
      every instance's cheapest path and fix the uncovered ones (large right, cheapest wrong) with
      the smallest extra cost until the target holds (unit values ⇒ greedy by cost is optimal).
    """
    oc = baselines.oracle_costs(trees.subset(problems))
    j = np.arange(len(problems))
    cheap, cheap_ok = oc.cheapest[j, roots], oc.cheapest_is_correct[j, roots]
    best_c = oc.cheapest_correct[j, roots]
    large_right = trees.solo_correct[problems, -1]
    solvable = np.isfinite(best_c)
    max_acc = Outcome(correct=solvable | cheap_ok, cost=np.where(solvable, best_c, cheap),
                      escalation=np.full(len(j), -1), large_right=large_right, problems=problems)
    correct = cheap_ok.copy()
    cost = cheap.copy()
    uncovered = ~cheap_ok & large_right
    need = int(np.ceil((1 - alpha) * len(j))) - int((cheap_ok | ~large_right).sum())
    if need > 0:
        extra = np.where(uncovered & solvable, best_c - cheap, np.inf)
        order = np.argsort(extra)[:need]
        order = order[np.isfinite(extra[order])]
        correct[order] = True
        cost[order] = best_c[order]
    target = Outcome(correct=correct, cost=cost, escalation=np.full(len(j), -1),
                     large_right=large_right, problems=problems)
    out = {"oracle (max accuracy)": summarize(max_acc), "oracle (coverage 1-α)": summarize(target)}
    for v in out.values():
        v["escalation_rate"] = float("nan")  # the oracle is not a stepwise policy
        v["mean_escalation_step"] = float("nan")
    return out


def select_on_cal(curve_cal: list[dict], large_acc: float) -> int:
    """Index of the grid point chosen on the calibration split: the largest A/C among points within
    1 accuracy point of large-only (the paper's selection rule is unstated; BUILD_NOTES.md), else
    the most accurate point."""
    ok = [i for i, r in enumerate(curve_cal) if r["accuracy"] >= large_acc - 1.0]
    if ok:
        return max(ok, key=lambda i: curve_cal[i]["acc_per_cost"])
    return max(range(len(curve_cal)), key=lambda i: curve_cal[i]["accuracy"])


def cost_at_accuracy(curve: list[dict], accuracy: float) -> float:
    """Cost a method needs for `accuracy`, on the lower convex hull of its (accuracy, cost) points
    (mixing two operating points at random reaches any point between them). nan if out of range."""
    pts = sorted({(r["accuracy"], r["cost"]) for r in curve})
    hull: list[tuple[float, float]] = []
    for p in pts:  # lower hull, increasing accuracy
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    # Keep the part where cost does not decrease with accuracy (the efficient frontier).
    start = int(np.argmin([c for _, c in hull]))
    front = hull[start:]
    xs, ys = [x for x, _ in front], [y for _, y in front]
    if accuracy < xs[0]:
        return ys[0]
    if accuracy > xs[-1]:
        return float("nan")
    return float(np.interp(accuracy, xs, ys))


def choose_point(grid: Sequence[float], curve_cal: list[dict], curve_test: list[dict],
                 large_acc_cal: float) -> dict[str, Any]:
    """The one "select on the calibration split, report on the test split" routine (offline
    sweeps and live grid searches): the point `select_on_cal` picks on `curve_cal`, its test
    row (with its threshold) and the whole test curve."""
    i = select_on_cal(curve_cal, large_acc_cal)
    curve = [dict(r, threshold=float(g)) for r, g in zip(curve_test, grid, strict=True)]
    return {"index": i, "threshold": float(grid[i]), "row": dict(curve[i]), "curve": curve}


def sweep(name: str, actions_fn: Callable[[float], np.ndarray], grid, trees, dev, cal, test,
          large_acc: float) -> dict[str, Any]:
    """Run a thresholded method over `grid` on cal and test; pick on cal; report test."""
    (pc, rc), (pt, rt) = cal, test
    full_c = {g: actions_fn(g) for g in grid}
    curve_cal = [summarize(walk_outcome(trees, dev, pc, rc, full_c[g][pc])) for g in grid]
    curve_test = [summarize(walk_outcome(trees, dev, pt, rt, full_c[g][pt])) for g in grid]
    return {"name": name, **choose_point(grid, curve_cal, curve_test, large_acc)}


def evaluate_all(trees: PackedTrees, log_prob_fn: Callable, kappa: float, alpha: float,
                 confidence_feature: int | None, step_feature: int | None,
                 seed: int = 0) -> dict[str, Any]:
    """The router and every replayable baseline on the test split.

    `log_prob_fn(features [..., D], model [...]) -> log π [..., K]` is the router's policy (e.g.
    `policy_fn(networks, state)` or `Router.log_probs`).

    Returns {"rows": [{"method", "external", ...summary}], "curves": {method: [points]}}.
    """
    dev = env.to_device(trees)
    cal = env.instances(trees, trees.split_indices("cal"))
    test = env.instances(trees, trees.split_indices("test"))
    pt, rt = test
    if len(pt) == 0:
        raise ValueError("no usable problems in the 'test' split")
    k = trees.num_models
    rows, curves = [], {}

    def add(name, summary, external="–", extra=None):
        rows.append({"method": name, "external": external, **summary, **(extra or {})})

    for m in range(k):
        add(f"model {m} only", summarize(solo_outcome(trees, pt, m), seed))
    large_acc_cal = 100.0 * float(trees.solo_correct[cal[0], -1].mean()) if len(cal[0]) else 0.0

    # The router: Γ at the deployed κ, plus its own κ curve.
    all_sub = env.gather(dev, jnp.arange(trees.num_problems))

    def router_actions(kap):
        return np.asarray(env.greedy_actions(log_prob_fn, all_sub, jnp.float32(kap)))

    routed = router_actions(kappa)
    add("TCPO router (ours)", summarize(walk_outcome(trees, dev, pt, rt, routed[pt]), seed),
        "no", {"threshold": float(kappa)})
    # The router's own curve: κ at quantiles of its escalation scores (its probabilities often
    # sit near 0 or 1, where an even grid in [0, 1] would see nothing).
    scores = np.asarray(env.escalation_scores(log_prob_fn, all_sub))[pt]
    valid = np.arange(scores.shape[-1])[None, None] < trees.seg_len[pt][..., None]
    qs = np.quantile(scores[valid], np.linspace(0, 1, 21)) if valid.any() else np.zeros(1)
    kgrid = sorted({0.0, float(kappa), *map(float, qs), float(np.nextafter(qs.max(), 2))})
    curves["TCPO router (ours)"] = [
        dict(summarize(walk_outcome(trees, dev, pt, rt, router_actions(g)[pt]), seed), threshold=g)
        for g in kgrid]

    methods: list[tuple[str, Callable[[float], np.ndarray], Any]] = [
        ("random escalation", lambda q: baselines.random_escalation(trees, q, seed),
         baselines.GRID)]
    if confidence_feature is not None:
        train_valid = baselines.node_mask(trees) & (trees.split == 0)[:, None, None]
        conf = trees.features[..., confidence_feature][train_valid]
        qs = np.quantile(conf, baselines.GRID) if conf.size else np.zeros(len(baselines.GRID))
        methods.append(("confidence threshold",
                        lambda tau: baselines.confidence_threshold(trees, confidence_feature, tau),
                        [float(q) for q in qs]))
        if step_feature is not None:
            steer = baselines.fit_steer(trees.subset(trees.split_indices("train")),
                                        confidence_feature, step_feature)
            methods.append(("STEER", lambda tau: baselines.steer_actions(steer, trees, tau),
                            baselines.GRID))
    for name, fn, grid in methods:
        res = sweep(name, fn, grid, trees, dev, cal, test, large_acc_cal)
        add(name, res["row"], "no", {"threshold": res["row"]["threshold"]})
        curves[name] = res["curve"]
    for name, summary in oracle_summary(trees, pt, rt, alpha).items():
        add(name, summary, "oracle")
    return {"rows": rows, "curves": curves, "matched": matched_costs(rows, curves)}


def matched_costs(rows: list[dict], curves: dict[str, list[dict]],
                  reference: str = "TCPO router (ours)") -> dict[str, Any]:
    """Each curve's cost at the reference row's accuracy (lower hull; nan when out of reach)."""
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None:
        return {}
    return {"reference": reference, "accuracy": ref["accuracy"], "cost": ref["cost"],
            "costs": {name: cost_at_accuracy(c, ref["accuracy"]) for name, c in curves.items()
                      if name != reference}}


def policy_fn(networks, state) -> Callable:
    """`log_prob_fn` of a trained state."""
    return lambda o, m: networks.log_probs(state.policy_params, state.normalizer, o, m)


# ------------------------------------------------------------------------------------------------
# Live runs (records of `generation.online.run_online`, see `jaxroute.records`)


def records_outcome(recs: Sequence[dict], large_right: dict[str, bool],
                    models: Sequence, cost_model: str) -> Outcome:
    """The `Outcome` of a live run; R_M per problem id from `large_right`. The escalation index
    is the first piece that model 0 did not keep (a discarded draft, or a larger model's)."""
    pids = sorted({r["problem_id"] for r in recs})
    index = {p: i for i, p in enumerate(pids)}
    esc = []
    for r in recs:
        first = [i for i, p in enumerate(r["pieces"]) if not p.get("kept", True)
                 or p["model"] != 0]
        esc.append(first[0] if first else -1)
    return Outcome(correct=np.array([r["correct"] for r in recs], bool),
                   cost=np.array([records.record_cost(r, models, cost_model) for r in recs]),
                   escalation=np.array(esc),
                   large_right=np.array([large_right[r["problem_id"]] for r in recs], bool),
                   problems=np.array([index[r["problem_id"]] for r in recs]))


def summarize_records(recs: Sequence[dict], large_right: dict[str, bool], models: Sequence,
                      cost_model: str, seed: int = 0) -> dict[str, Any]:
    """`summarize` of a live run, plus the scorer column (its mean per problem) and the share of
    generated tokens that were discarded drafts."""
    row = summarize(records_outcome(recs, large_right, models, cost_model), seed)
    row["scorer_cost"] = float(np.mean([records.scorer_cost(r, cost_model) for r in recs]))
    gen = sum(p["cost"]["output_tokens"] for r in recs for p in r["pieces"])
    dropped = sum(p["cost"]["output_tokens"] for r in recs for p in r["pieces"]
                  if not p.get("kept", True))
    row["discarded_token_share"] = dropped / gen if gen else 0.0
    return row
